"""The load generator's workload: seeded jobs, Zipf popularity and the base share, and what each model pair
is sent (no server needed)."""

from __future__ import annotations

from collections import Counter

import prompts
from loadtests import scenarios, soak
from loadtests.workload import Mix, build_jobs, pair_mix, zipf_weights
from server.pairs import PAIRS

WORDS = [[f"w{i}" for i in range(500)], [f"v{i}" for i in range(500)]]


def test_zipf_weights_fall_as_one_over_rank_to_the_s():
    w = zipf_weights(4, 1.0)
    assert abs(sum(w) - 1.0) < 1e-12
    assert [round(w[0] / x, 9) for x in w] == [1.0, 2.0, 3.0, 4.0]


def test_same_seed_same_jobs_and_the_mix_follows_its_weights():
    mix = Mix("base", adapters=("a", "b", "c"), zipf_s=1.0, base_share=0.3, output_min=5, output_max=9)
    jobs = build_jobs(mix, 3000, seed=7, words=WORDS)
    assert jobs == build_jobs(mix, 3000, seed=7, words=WORDS)
    counts = Counter(j.model for j in jobs)
    assert 0.25 < counts["base"] / 3000 < 0.35
    assert counts["a"] > counts["b"] > counts["c"] > 0
    assert all(5 <= j.output_len <= 9 and j.prompt for j in jobs)
    assert {j.api for j in jobs} == {"chat", "completions"}


def test_the_demo_pair_gets_the_mix_as_it_was():
    mix = pair_mix("demo", "demo-target", ("austen", "stdlib-docs"), base_share=0.3, output_min=5, output_max=9)
    assert mix == Mix("demo-target", ("austen", "stdlib-docs"), base_share=0.3, output_min=5, output_max=9)
    assert mix.prompts is None and mix.chat_share == 0.5


def test_smollm2_gets_chat_requests_each_model_its_own_prompt_set():
    base = PAIRS["smollm2"].served_model_name
    adapters = ("austen", "stdlib-docs", "zipf-2", "zipf-3")  # as scenarios.ensure_adapters names them
    jobs = build_jobs(pair_mix("smollm2", base, adapters, base_share=0.3), 400, seed=3)
    assert jobs == build_jobs(pair_mix("smollm2", base, adapters, base_share=0.3), 400, seed=3)
    assert {j.api for j in jobs} == {"chat"}
    sets = {m: set(prompts.domain_prompts(d)) for m, d in ((base, "chat"), ("austen", "style"),
            ("zipf-2", "style"), ("stdlib-docs", "python-docs"), ("zipf-3", "python-docs"))}  # fmt: skip
    assert {j.model for j in jobs} == set(sets)
    assert all(j.prompt in sets[j.model] for j in jobs)


def test_scenarios_and_churn_follow_the_pair():
    base = PAIRS["smollm2"].served_model_name
    smoke = scenarios.build("smoke", base, pair="smollm2")
    assert {j.api for j in smoke.jobs} == {"chat"} and all(8 <= j.output_len <= 16 for j in smoke.jobs)
    sc = scenarios.build("churn", base, ("austen", "stdlib-docs"), requests=20, pair="smollm2")
    assert sc.churn.folder == PAIRS["smollm2"].seed_adapters / "austen"
    assert (sc.churn.api, sc.churn.prompt) == ("chat", prompts.domain_prompts("style")[0])
    demo = scenarios.build("churn", "demo-target", requests=20)
    assert demo.churn.folder == PAIRS["demo"].seed_adapters / "austen" and demo.churn.api == "completions"
    assert {j.api for j in demo.jobs} == {"chat", "completions"}
    assert scenarios.build("base", "demo-target", requests=20).jobs == build_jobs(
        Mix("demo-target", output_min=48, output_max=64), 20
    )


def test_the_soak_mix_is_the_pairs():
    mix = soak._mix("http://127.0.0.1:9", soak.SoakConfig(pair="smollm2", adapters=2))  # 2: nothing uploaded
    assert mix.base_model == "smollm2-135m-instruct" and mix.chat_share == 1.0 and mix.adapters == scenarios.SHIPPED
    demo = soak._mix("http://127.0.0.1:9", soak.SoakConfig(adapters=2))
    assert demo == Mix("demo-target", scenarios.SHIPPED, base_share=0.3, output_min=48, output_max=64)
