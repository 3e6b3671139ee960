"""curate.py on hand-made rollouts: groups, sharpening, de-duplication, advantages, MIL — exact."""
import itertools
import json
import statistics
import subprocess
import sys

import pytest

import curate
from conftest import ROOT
import losses


def rollouts(pid, scores, valid=None):
    return [{"problem_id": pid, "sample": j, "prompt": [{"role": "user", "content": pid}], "prefill": "",
             "completion": f"c{j}", "completion_ids": [j], "score": s,
             "valid": True if valid is None else valid[j]} for j, s in enumerate(scores)]


def naive_sharpen(scores, n, t, min_var):
    """Straight from ARCHITECTURE §6, no shortcuts: every n-subset, variance filter, top-t + bottom-t."""
    out = set()
    for sub in itertools.combinations(range(len(scores)), n):
        if statistics.pvariance([scores[i] for i in sub]) < min_var:
            continue
        ranked = sorted(sub, key=lambda i: (-scores[i], i))
        g = tuple(sorted(ranked[:t] + ranked[-t:]))
        if len({scores[i] for i in g}) > 1:
            out.add(g)
    return out


def test_equal_scores_dropped():
    assert curate.problem_groups([0.5] * 8) == []
    groups, stats = curate.curate(rollouts("p", [1.0] * 8) + rollouts("q", [0, 1, 0, 0, 0, 0, 0, 0]))
    assert stats["problems"] == 2 and stats["problems_kept"] == 1
    assert {g["problem_id"] for g in groups} == {"q"}


def test_sharpening_matches_naive_and_dedups():
    scores = [1.0, 0.0, 0.5, 0.25, 1.0, 0.0, 0.75, 0.0]
    got = curate.problem_groups(scores, n=6, group_size=4, min_var=0.01, groups_per_problem=1000)
    assert len(got) == len(set(map(tuple, got)))  # no duplicates
    assert set(map(tuple, got)) == naive_sharpen(scores, 6, 2, 0.01)
    # sharpening keeps extremes: every group holds the subset's top-2 and bottom-2
    for g in got:
        assert len(g) == 4


def test_hand_computed_groups_and_cap_by_variance():
    # 4 samples, n=3, 2t=2: subsets of 3 -> top-1 + bottom-1
    scores = [1.0, 0.0, 0.5, 0.0]
    # subsets: (0,1,2)->(0,1) var .25; (0,1,3)->(0,1); (0,2,3)->(0,3) var .25; (1,2,3)->(2,3) var .0625
    # (equal scores rank by sample index, so the bottom-1 of (1,2,3) is sample 3)
    got = curate.problem_groups(scores, n=3, group_size=2, min_var=0.01, groups_per_problem=10)
    assert got == [[0, 1], [0, 3], [2, 3]]  # variance desc, ties by indices
    assert curate.problem_groups(scores, n=3, group_size=2, min_var=0.01, groups_per_problem=2) == [[0, 1], [0, 3]]
    # min-var filters the (1,2,3) subset (var of {0, .5, 0} = 0.0556)
    assert curate.problem_groups(scores, n=3, group_size=2, min_var=0.06, groups_per_problem=10) == [[0, 1], [0, 3]]


def test_advantages_exact():
    a = losses.advantages([1.0, 0.0, 0.0, 1.0])
    assert a == pytest.approx([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6)])
    a = losses.advantages([0.9, 0.3, 0.0])
    mean, std = 0.4, statistics.pstdev([0.9, 0.3, 0.0])
    assert a == pytest.approx([(s - mean) / (std + 1e-6) for s in [0.9, 0.3, 0.0]])
    assert sum(a) == pytest.approx(0, abs=1e-9)


def test_mil():
    assert curate.interval_length([1.0, 0.75, 0.25, 0.0]) == 0.5  # s_(2) - s_(3)
    assert curate.interval_length([0.0, 1.0]) == 1.0
    assert curate.interval_length([1, 1, 0, 0, 0, 0]) == 0  # t = 3: 1,1,0 | 0,0,0
    assert curate.interval_length([1, 1, 1, 0, 0, 0]) == 1


def test_group_rows_and_stats():
    groups, stats = curate.curate(rollouts("p", [1, 0, 0, 1, 0, 0], valid=[True, False, True, True, True, True]),
                                  n=4, group_size=2, groups_per_problem=1)
    assert len(groups) == 1
    g = groups[0]
    assert [m["sample"] for m in g["members"]] == [0, 2]  # top-1 = first best, bottom-1 = last worst
    assert [m["advantage"] for m in g["members"]] == pytest.approx([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)])
    assert g["std"] == 0.5 and g["mil"] == 1.0
    assert g["members"][0]["completion"] == "c0" and g["members"][1]["completion_ids"] == [2]
    assert stats["valid_fraction"] == pytest.approx(5 / 6) and stats["groups"] == 1
    # --drop-invalid removes sample 2 (the one picked above) before grouping
    groups, _ = curate.curate(rollouts("p", [1, 0, 0, 1, 0, 0], valid=[True, True, False, True, True, True]),
                              n=4, group_size=2, groups_per_problem=10, drop_invalid=True)
    assert groups and all(m["sample"] != 2 for g in groups for m in g["members"])


def test_modes_all_and_random():
    scores = [1, 0, 0, 0, 1, 0, 0, 0]
    assert curate.problem_groups(scores, mode="all") == [list(range(8))]
    got = curate.problem_groups(scores, mode="random", n=6, group_size=4, min_var=0.0, groups_per_problem=50, seed=3)
    assert got and all(len(g) == 4 for g in got)
    assert got == curate.problem_groups(scores, mode="random", n=6, group_size=4, min_var=0.0, groups_per_problem=50, seed=3)


def test_random_subsets_when_too_many_combos():
    scores = [float(i % 2) for i in range(16)]  # C(16, 14) = 120 > 50
    got = curate.problem_groups(scores, n=14, group_size=8, max_combos=50, groups_per_problem=100)
    assert got and all(len(g) == 8 for g in got)


def test_malformed_rollouts_exit_2(tmp_path):
    d = tmp_path / "iter_0"
    d.mkdir()
    good = json.dumps(rollouts("p", [1])[0])
    (d / "rollouts.jsonl").write_text(good + "\n" + good[: len(good) // 2] + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "curate.py"), "--run", str(tmp_path), "--iter", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "rollouts.jsonl:2" in r.stderr
    assert not (d / "groups.jsonl").exists()


def costed(pid, scores, tokens, valid=None, runs=1):
    rows = rollouts(pid, scores, valid)
    for r, t in zip(rows, tokens):
        r.update(prompt_tokens=t - t // 4, completion_tokens=t // 4, scores=[r["score"]] * runs)
    return rows


def test_cost_aware_reward_per_run_and_invalid_charged_one_unit():
    rows = costed("p", [1, 1, 0, 0], [200, 50, 100, 0], valid=[True, True, True, False], runs=2)
    # tokens are summed over a row's runs: two runs of 200 tokens is 100 a run, = 1 unit of 100
    assert [curate.cost(r, 100) for r in rows] == [1.0, 0.25, 0.5, 1.0]
    assert [curate.reward(r, 0.2, 100) for r in rows] == pytest.approx([0.8, 0.95, -0.1, -0.2])
    assert [curate.reward(r) for r in rows] == [1, 1, 0, 0]  # lambda 0: correctness, cost not even read


def test_cost_alone_sets_the_advantage_when_every_workflow_is_right():
    rows = costed("p", [1, 1, 1, 1], [100, 300, 100, 300])
    assert curate.curate(rows, min_var=0.0)[0] == []  # accuracy alone: no signal
    groups, stats = curate.curate(rows, n=4, group_size=4, min_var=0.0, cost_weight=0.1, ref_tokens=100)
    (g,) = groups
    assert [m["correct"] for m in g["members"]] == [1.0] * 4 and [m["cost"] for m in g["members"]] == [1, 3, 1, 3]
    assert [m["score"] for m in g["members"]] == pytest.approx([0.9, 0.7, 0.9, 0.7])
    # std-scaled: a 0.2 cost gap becomes advantages of +-1, as large as right against wrong ...
    assert [m["advantage"] for m in g["members"]] == pytest.approx([1, -1, 1, -1], abs=1e-4)
    # ... a floor of 1 keeps it at its size (mean-only), a floor below the std changes nothing
    floored, _ = curate.curate(rows, n=4, group_size=4, min_var=0.0, cost_weight=0.1, ref_tokens=100, std_floor=1.0)
    assert [m["advantage"] for m in floored[0]["members"]] == pytest.approx([0.1, -0.1, 0.1, -0.1], abs=1e-5)
    low, _ = curate.curate(rows, n=4, group_size=4, min_var=0.0, cost_weight=0.1, ref_tokens=100, std_floor=0.05)
    assert [m["advantage"] for m in low[0]["members"]] == [m["advantage"] for m in g["members"]]
    assert stats["cost_weight"] == 0.1 and stats["mean_cost"] == 2.0
    with pytest.raises(ValueError, match="ref_tokens"):
        curate.curate(rows, cost_weight=0.1)


def test_the_std_floor_defaults_to_1_only_with_a_cost_weight():
    """config.std_floor: plain GRPO (0) for accuracy-only scores, mean-only (1) once cost is in the
    score, and an explicit --std-floor always wins; curate.run applies it."""
    import config
    base = config.defaults()
    assert base["std_floor"] is None
    assert config.std_floor(dict(base)) == 0.0 and config.std_floor(dict(base, cost_weight=0.3)) == 1.0
    assert config.std_floor(dict(base, cost_weight=0.3, std_floor=0.0)) == 0.0
    assert config.std_floor(dict(base, std_floor=0.5)) == 0.5


def test_curate_run_keeps_cost_a_tie_breaker_by_default(tmp_path):
    from jsonl import read_jsonl, write_jsonl_atomic
    (tmp_path / "iter_0").mkdir()
    write_jsonl_atomic(tmp_path / "iter_0" / "rollouts.jsonl", costed("p", [1, 1, 1, 1], [100, 300, 100, 300]))
    import config
    cfg = dict(config.defaults(), n=4, group_size=4, min_var=0.0, cost_weight=0.1)
    curate.run(tmp_path, 0, cfg, ref_tokens=100)
    (g,) = read_jsonl(tmp_path / "iter_0" / "groups.jsonl")
    assert [m["advantage"] for m in g["members"]] == pytest.approx([0.1, -0.1, 0.1, -0.1], abs=1e-5)


def test_any_lambda_recurated_from_the_same_rollouts():
    rows = costed("p", [1, 0, 1, 0, 1, 1], [400, 100, 100, 300, 200, 100])
    plain, _ = curate.curate(rows, n=4, group_size=2, min_var=0.0)
    again, _ = curate.curate(json.loads(json.dumps(rows)), n=4, group_size=2, min_var=0.0, cost_weight=0.0, ref_tokens=1)
    assert again == plain  # lambda 0 with a unit = the accuracy-only groups, byte for byte
    for lam in (0.05, 0.3):
        groups, _ = curate.curate(rows, n=4, group_size=2, min_var=0.0, cost_weight=lam, ref_tokens=200)
        for g in groups:
            for m in g["members"]:
                r = rows[m["sample"]]
                assert m["score"] == pytest.approx(r["score"] - lam * (r["prompt_tokens"] + r["completion_tokens"]) / 200)


def test_guide_rows_join_groups_but_not_the_generator_stats():
    rows = rollouts("p", [1.0, 0.0, 0.0, 0.0]) + rollouts("p", [1.0, 1.0], valid=[True, True])
    for j, r in enumerate(rows[4:]):
        r.update(sample=4 + j, guide=True)
    groups, stats = curate.curate(rows, "all", n=6, group_size=6, groups_per_problem=1)
    (g,) = groups
    assert sorted(m["sample"] for m in g["members"]) == list(range(6))
    assert [m.get("guide", False) for m in sorted(g["members"], key=lambda m: m["sample"])] == [False] * 4 + [True] * 2
    assert stats["mean_score"] == 0.25 and stats["valid_fraction"] == 1.0  # the 4 sampled rows only


def test_the_run_seed_reaches_curate(tmp_path):
    """curate.run draws its random groups from --seed (config.seed_of(seed, "groups", it)): the same
    seed gives the same groups, another seed other groups."""
    import config
    from jsonl import read_jsonl, write_jsonl_atomic
    rows = [r for k in range(3) for r in rollouts(f"p{k}", [1, 0, 0, 0, 1, 0, 0, 0])]
    (tmp_path / "iter_0").mkdir()
    write_jsonl_atomic(tmp_path / "iter_0" / "rollouts.jsonl", rows)

    def groups(seed):
        cfg = dict(config.defaults(), groups="random", min_var=0.0, groups_per_problem=6, seed=seed)
        curate.run(tmp_path, 0, cfg)
        return [[m["sample"] for m in g["members"]] for g in read_jsonl(tmp_path / "iter_0" / "groups.jsonl")]
    assert groups(0) == groups(0)
    assert groups(0) != groups(1)
    # and through the CLI, which re-curates a run from its config.json (the seed is a run-level knob)
    (tmp_path / "config.json").write_text(json.dumps({"seed": 1, "groups": "random", "min_var": 0.0, "groups_per_problem": 6}))
    r = subprocess.run([sys.executable, str(ROOT / "curate.py"), "--run", str(tmp_path), "--iter", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [[m["sample"] for m in g["members"]] for g in read_jsonl(tmp_path / "iter_0" / "groups.jsonl")] == groups(1)


def test_cost_on_correct_pays_only_right_answers():
    """--cost-on correct: score = correctness * (1 - lambda * cost). A wrong answer scores 0 however
    cheap, so a group where every workflow is wrong is dropped instead of ranking the cheapest failure
    first; among right answers the cheaper still ranks higher."""
    rows = costed("p", [1, 1, 0, 0], [200, 50, 100, 0], valid=[True, True, True, False], runs=2)
    assert [curate.reward(r, 0.2, 100, "correct") for r in rows] == pytest.approx([0.8, 0.95, 0.0, 0.0])
    assert [curate.reward(r, 0.2, 100, "all") for r in rows] == [curate.reward(r, 0.2, 100) for r in rows]
    assert [curate.reward(r, 0.0, 100, "correct") for r in rows] == [1, 1, 0, 0]
    wrong = costed("p", [0, 0, 0, 0], [500, 50, 500, 50])
    paid_by_all, _ = curate.curate(wrong, n=4, group_size=4, min_var=0.0, cost_weight=0.3, ref_tokens=100)
    assert paid_by_all and max(paid_by_all[0]["members"], key=lambda m: m["advantage"])["cost"] == 0.5
    assert curate.curate(wrong, n=4, group_size=4, min_var=0.0, cost_weight=0.3, ref_tokens=100, cost_on="correct")[0] == []
    right = costed("p", [1, 1, 0, 0], [500, 50, 500, 50])
    (g,), _ = curate.curate(right, n=4, group_size=4, min_var=0.0, cost_weight=0.3, ref_tokens=100, cost_on="correct")
    # the cheap right answer first; a right answer costing more than 1 / lambda units is worth no
    # more than a wrong one (the factor is clipped at 0), never less
    assert [(m["correct"], m["cost"]) for m in g["members"]] == [(1.0, 5.0), (1.0, 0.5), (0.0, 5.0), (0.0, 0.5)]
    assert [m["score"] for m in g["members"]] == pytest.approx([0.0, 0.85, 0.0, 0.0])
    assert max(g["members"], key=lambda m: m["advantage"])["cost"] == 0.5
