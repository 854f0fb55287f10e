"""The load generator's workload: seeded jobs, Zipf popularity and the base share (no server needed)."""

from __future__ import annotations

from collections import Counter

from loadtests.workload import Mix, build_jobs, zipf_weights

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
