"""tests/near_tie.py, the rule the greedy-equality tests share, on hand-made token lists."""

from __future__ import annotations

from tests.near_tie import Token, completion_tokens, parting


def run(*tokens: tuple[str, float, dict[str, float]]) -> list[Token]:
    return [Token(text, text, lp, top) for text, lp, top in tokens]


A = ("a", -0.1, {"a": -0.1, "b": -3.0})


def test_equal_runs_and_a_parting_at_a_near_tie_pass():
    assert parting(run(A, A), run(A, A)) is None
    tie = ("x", -0.70, {"x": -0.70, "y": -0.73})
    assert parting(run(A, ("y", -0.73, {})), run(A, tie)) is None  # 0.03 nats apart: rounding may flip it


def test_a_parting_by_more_than_rounding_fails_and_says_where():
    ref = run(A, ("x", -0.5, {"x": -0.5, "y": -1.5}))
    why = parting(run(A, ("y", -1.5, {})), ref)
    assert why is not None and "token 1 ('y') by 1.000 nats" in why
    assert parting(run(A), run(A, A)).startswith("lengths differ")


def test_the_tolerance_scales_with_the_runs_rounding_noise_up_to_a_cap():
    ref = run(A, ("x", -0.5, {"x": -0.5, "y": -0.6}))  # a 0.1-nat gap: above NEAR_TIE
    noisy = run(("a", -0.16, {}), ("y", -0.6, {}))  # the agreed token's logprob moved 0.06: rounding noise
    assert parting(noisy, ref) is not None
    assert parting(noisy, ref, scale_with_noise=True) is None  # 0.1 < 2 x 0.06
    wild = run(("a", -1.1, {}), ("y", -0.6, {}))  # 1 nat of "noise" is no rounding: the cap (0.2) holds
    far = run(A, ("x", -0.5, {"x": -0.5, "y": -0.75}))
    assert parting(wild, far, scale_with_noise=True) is not None


def test_completion_responses_compare_by_token_id():
    def response(ids, texts):
        lp = {"tokens": texts, "token_logprobs": [-0.1] * len(ids), "top_logprobs": [{t: -0.1} for t in texts]}
        return {"choices": [{"token_ids": ids, "logprobs": lp}]}

    assert (
        parting(completion_tokens(response([1, 2], ["a", "b"])), completion_tokens(response([1, 2], ["a", "b"])))
        is None
    )
    why = parting(completion_tokens(response([1, 2], ["a", "b"])), completion_tokens(response([1, 3], ["a", "c"])))
    assert why is not None and "token 1 ('b')" in why
