"""report.py: the per-kind table, the headroom against a hand calculation, operator sequences, and
the figures, on hand-made held-out rows.

    python -m pytest -q tests/test_report.py
"""
import json
import statistics

import pytest

import benchmarks
import config
import costs
import report
from jsonl import DataError


def rows(scores, code="def solve(problem):\n    return programmer(problem)\n", valid=True):
    return [{"problem_id": p, "score": s, "valid": valid, "code": code, "calls": 1, "prompt_tokens": 0,
             "completion_tokens": 0, "cost_usd": 0.0, "seconds": 0.0} for p, s in scores.items()]


KINDS = {"a1": "arith", "a2": "arith", "s1": "sentiment", "s2": "sentiment"}
# programmer wins arith, io wins sentiment; each alone scores 2/4, the oracle 4/4
PROGRAMMER = {"a1": 1.0, "a2": 1.0, "s1": 0.0, "s2": 0.0}
IO = {"a1": 0.0, "a2": 0.0, "s1": 1.0, "s2": 1.0}


def test_operator_sequence_is_execution_order():
    assert report.operator_sequence("def solve(p):\n    return format(p, programmer(p))\n") == "programmer -> format"
    code = "def solve(p):\n    d = [answer_generate(p) for _ in range(3)]\n    return ensemble(p, d)\n"
    assert report.operator_sequence(code) == "answer_generate -> ensemble"
    assert report.operator_sequence("def solve(p):\n    return len(p)\n") == "(no operator)"
    assert report.operator_sequence("def solve(p:\n") == "(unparsable)"


def test_kind_section_on_hand_made_rows():
    it0 = rows({"a1": 0.0, "a2": 0.0, "s1": 1.0, "s2": 0.0}, code="def solve(p):\n    return custom(p, 'x')\n")
    it1 = rows(PROGRAMMER)[:2] + rows({"s1": 1.0, "s2": 1.0}, code="def solve(p):\n    return custom(p, 'x')\n")
    it1[0]["valid"] = False  # an invalid workflow is its own entry
    lines = report.kind_section({0: it0, 1: it1}, {"programmer": rows(PROGRAMMER), "io": rows(IO)}, KINDS)
    text = "\n".join(lines)
    assert lines[0] == "| workflows | arith | sentiment | overall | share of headroom |"
    # iteration 0: arith 0/2, sentiment 1/2 -> overall 0.25; share (0.25 - 0.5) / 0.5 = -0.5
    assert "| iteration 0 | 0.0 | 50.0 | 25.0 | -0.50 |" in text
    # iteration 1 is the oracle: share 1
    assert "| iteration 1 | 100.0 | 100.0 | 100.0 | +1.00 |" in text
    assert "| fixed io | 0.0 | 100.0 | 50.0 | |" in text
    assert "| 0 | custom (100 %) | custom (100 %) |" in text
    assert "| 1 | (invalid) (50 %), programmer (50 %) | custom (100 %) |" in text  # a tie: the first seen first
    assert "headroom **+50.0 points**" in text


def test_report_writes_its_figures(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "iter_0").mkdir()
    for k, sc in ((0, IO), (1, PROGRAMMER)):
        (run / "eval" / f"iter_{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(sc)))
    (run / "iter_0" / "train_log.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": 1.0 / (i + 1), "kl": 0.01 * i, "clip_frac": 0.0}) + "\n" for i in range(4)))
    out = report.figures(run, {0: rows(IO), 1: rows(PROGRAMMER)}, {"io": rows(IO)}, KINDS)
    assert out == ["![held-out accuracy per iteration](accuracy.png)", "![accuracy per kind per iteration](kinds.png)",
                   "![accuracy against executor tokens per problem](cost.png)",
                   "![update curves: loss, KL, clip fraction](training.png)"]
    for name in ("accuracy.png", "kinds.png", "cost.png", "training.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_md_has_the_per_kind_section_for_a_benchmark_with_kinds(tmp_path):
    """arith's problems carry a kind (single, paren, word): the report's per-kind section and figures
    come from the rows in the run directory and the baselines beside it."""
    cfg = dict(config.defaults(), eval_problems=6)
    probs = benchmarks.load("arith", "test", limit=6, seed=0)
    run = tmp_path / "runs" / "r"
    (run / "eval").mkdir(parents=True)
    sc = {p["id"]: float(i % 2) for i, p in enumerate(probs)}
    (run / "eval" / "iter_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(sc)))
    base = report.baseline_path(cfg, "io", "test", 6, run.parent)
    base.parent.mkdir(parents=True)
    base.write_text("".join(json.dumps(r) + "\n" for r in rows({p: 1.0 for p in sc})))
    # router.py's rows for these problems beside the baselines: the report shows the router too
    router = rows({p: 0.0 for p in sc}, code="def solve(p):\n    return format(p, programmer(p))\n")
    base.with_name("router.jsonl").write_text("".join(json.dumps(r) + "\n" for r in router))
    text = report.write(run, cfg, 0, 60.0, baselines={"io": report.summarize(rows({p: 1.0 for p in sc}))}).read_text()
    assert "## Per kind" in text and "## Figures" in text and (run / "accuracy.png").is_file()
    assert "## Accuracy and executor cost" in text and "S* (share of the best single" in text
    assert "| router | 0.0 [0.0, 0.0] | 1.00 | 0 | – |" in text  # nothing to save: every workflow spends 0
    assert "| router | programmer -> format (100 %)" in text
    assert "![accuracy against executor tokens per problem](cost.png)" in text
    assert (run / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kinds = sorted({p["kind"] for p in probs})
    assert all(k in text for k in kinds)
    assert f"{100 * statistics.fmean(sc.values()):.1f}" in text


def test_groups_section_names_what_each_kind_pushed_up_and_down(tmp_path):
    """Hand-made iteration: one arith problem with a group (programmer +1, custom -1, an invalid one
    -0.5), one arith without, one sentiment problem with the opposite group."""
    train = benchmarks.load("mixed", "train")
    a1, a2 = [p["id"] for p in train if p["kind"] == "arith"][:2]
    s1 = next(p["id"] for p in train if p["kind"] == "sentiment")
    prog, cust = "def solve(p):\n    return programmer(p)\n", "def solve(p):\n    return custom(p, 'x')\n"
    roll = [(a1, 0, prog, True), (a1, 1, cust, True), (a1, 2, "def solve(p:\n", False), (a2, 0, prog, True),
            (s1, 0, cust, True), (s1, 1, prog, True)]
    groups = [{"problem_id": a1, "members": [{"sample": 0, "advantage": 1.0}, {"sample": 1, "advantage": -1.0},
                                             {"sample": 2, "advantage": -0.5}]},
              {"problem_id": s1, "members": [{"sample": 0, "advantage": 1.0}, {"sample": 1, "advantage": -1.0}]}]
    d = tmp_path / "iter_0"
    d.mkdir()
    (d / "rollouts.jsonl").write_text("".join(json.dumps({"problem_id": p, "sample": j, "code": c, "valid": v}) + "\n"
                                              for p, j, c, v in roll))
    (d / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    lines = report.groups_section(tmp_path, "mixed", None, 1)
    assert lines[2:] == ["| 0 | arith | 1/2 | programmer (+1.00, 1) | custom (-1.00, 1) |",
                         "| 0 | sentiment | 1/1 | custom (+1.00, 1) | programmer (-1.00, 1) |"]


# ---- the cost oracle (costs.py) ----

def _two_kinds():
    """Kind A (200 problems): io right on 100 at 10 tokens each, programmer on 101 at 100 tokens:
    programmer is A's best by half a point, io the cheapest within one. Kind B (200): io 20 right,
    programmer 180, same prices: programmer is best and cheapest-near-best."""
    kinds = {f"a{i}": "A" for i in range(200)} | {f"b{i}": "B" for i in range(200)}
    scores = {"io": {p: float((p[0] == "a" and int(p[1:]) < 100) or (p[0] == "b" and int(p[1:]) < 20)) for p in kinds},
              "programmer": {p: float((p[0] == "a" and int(p[1:]) < 101) or (p[0] == "b" and int(p[1:]) < 180))
                             for p in kinds}}
    toks = {"io": dict.fromkeys(kinds, 10), "programmer": dict.fromkeys(kinds, 100)}
    return scores, toks, kinds


def test_cost_oracle_on_hand_made_rows():
    scores, toks, kinds = _two_kinds()
    res = costs.cost_oracle(scores, toks, kinds)
    a, b = res["per_kind"]["A"], res["per_kind"]["B"]
    assert (a["best"], a["cheap"], a["best_acc"], a["cheap_acc"]) == ("programmer", "io", 0.505, 0.5)
    assert (a["best_tokens"], a["cheap_tokens"]) == (100, 10)
    assert (b["best"], b["cheap"], b["cheap_acc"]) == ("programmer", "programmer", 0.9)
    # best single: programmer, 281/400 at 100 tokens; the cost oracle: io on A, programmer on B
    assert res["single"] == "programmer" and res["single_acc"][0] == pytest.approx(281 / 400)
    assert res["oracle_tokens"] == pytest.approx(55) and res["oracle"][0] == pytest.approx(280 / 400)
    oracle = [scores["io" if kinds[p] == "A" else "programmer"][p] for p in kinds]
    assert res["oracle"][1:] == report.bootstrap_ci(oracle)
    assert res["acc_oracle"][0] == pytest.approx(281 / 400) and res["acc_oracle_tokens"] == pytest.approx(100)
    assert res["saving"] == pytest.approx(0.45)  # S* = 1 - 55 / 100
    assert [costs.share_of_saving(res, t) for t in (55, 100, 77.5, 145)] == pytest.approx([1, 0, 0.5, -1])
    text = "\n".join(costs.cost_table(res, {"fixed io": rows(scores["io"])}))
    assert "| A (n=200) | programmer: 50.5, 100 | io: 50.0, 10 |" in text
    assert "| B (n=200) | programmer: 90.0, 100 | programmer: 90.0, 100 |" in text
    assert "S* (share of the best single workflow's tokens the cost oracle saves): **45.0 %**" in text
    # the io rows of the helper spend 0 tokens: more than S* saved, share (100 - 0) / (100 - 55)
    assert f"| fixed io | {costs.pct(*costs.mean_ci([scores['io'][p] for p in sorted(kinds)]))} | 1.00 | 0 | +2.22 |" in text


def test_cost_oracle_ties_and_missing_rows():
    kinds = {f"p{i}": "K" for i in range(100)}
    # 51 % against 50 %: exactly one point apart (0.51 - 0.50 > 0.01 in floating point) still counts
    scores = {"x": {p: float(int(p[1:]) < 51) for p in kinds}, "y": {p: float(int(p[1:]) < 50) for p in kinds},
              "z": {p: float(int(p[1:]) < 51) for p in kinds}}
    toks = {"x": dict.fromkeys(kinds, 30), "y": dict.fromkeys(kinds, 20), "z": dict.fromkeys(kinds, 25)}
    res = costs.cost_oracle(scores, toks, kinds)
    # x and z tie on accuracy: the cheaper z is best; y is within one point and cheaper still
    assert res["per_kind"]["K"]["best"] == "z" and res["per_kind"]["K"]["cheap"] == "y" and res["single"] == "z"
    assert costs.cost_oracle(scores, toks, kinds, within=0.005)["per_kind"]["K"]["cheap"] == "z"
    del toks["y"]["p3"]
    with pytest.raises(DataError, match="'y' has no token count for problem 'p3'"):
        costs.cost_oracle(scores, toks, kinds)


def test_paired_difference_and_the_runs_table_against_a_hand_calculation():
    """costs.paired is the bootstrap CI of the per-problem differences (not of two separate means);
    runs_table's rows and its mean +- sd line follow from hand-made rows."""
    ids = [f"p{i}" for i in range(40)]
    base = rows({p: float(i % 2) for i, p in enumerate(ids)})            # 50 %
    a = rows({p: float(i % 2 or i % 4 == 0) for i, p in enumerate(ids)})  # base, plus every 4th problem
    d = [float(int(p[1:]) % 4 == 0) for p in sorted(ids)]  # resampled in problem-id order, like costs.point
    assert costs.paired(a, base) == (statistics.fmean(d), *costs.bootstrap_ci(d))
    assert costs.paired(a, base)[0] == pytest.approx(0.25)
    assert costs.paired(base, base) == (0.0, 0.0, 0.0)
    with pytest.raises(DataError, match="'p0' to pair with"):
        costs.paired(a, base[1:])
    for r in a:
        r["prompt_tokens"] = 30  # run a spends 30 tokens a problem, run b none
    res = {"single_tokens": 40.0, "oracle_tokens": 20.0}
    lines = costs.runs_table(res, {"a": a, "b": base}, {"fixed": base})
    assert lines[0].startswith("| run | accuracy % (95 % CI) | vs fixed, paired | tokens/problem")
    assert lines[2] == (f"| a | {costs.pct(*costs.point(a)[1:4])} | +25.0 "
                        f"[{100 * costs.bootstrap_ci(d)[0]:+.1f}, {100 * costs.bootstrap_ci(d)[1]:+.1f}] | 30 | 1.00 | +0.50 | 100 |")
    assert lines[3].startswith("| b | 50.0 [") and lines[3].endswith("| +0.0 [+0.0, +0.0] | 0 | 1.00 | +2.00 | 100 |")
    acc_sd = statistics.stdev([0.75, 0.5])
    assert lines[4] == f"| mean ± sd of 2 | 62.5 ± {100 * acc_sd:.1f} |  | 15 ± 21 | 1.00 ± 0.00 | +1.25 ± 1.06 | |"


def test_compare_runs_reads_each_runs_checkpoint_and_the_shared_baselines(tmp_path):
    import evaluate
    probs = benchmarks.load("mixed", "test", limit=6, seed=0)
    root = tmp_path / "runs"
    cfg = dict(config.defaults(), bench="mixed", eval_problems=6)
    for b, sc in (("io", 0.0), ("programmer_format", 1.0)):
        path = report.baseline_path(cfg, b, "test", 6, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows({p["id"]: sc for p in probs})))
    for seed in (0, 1):
        run = root / f"s{seed}"
        (run / "eval").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"bench": "mixed", "eval_problems": 6, "seed": seed}))
        (run / "eval" / "iter_3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows({p["id"]: float(seed) for p in probs})))
    text = evaluate.runs_comparison([root / "s0", root / "s1"], 3)
    assert "| s0 | 0.0 [0.0, 0.0] | -100.0 [-100.0, -100.0] |" in text and "| s1 | 100.0 [100.0, 100.0] | +0.0" in text
    assert "| run | " in text and "programmer (100 %)" in text and "| mean ± sd of 2 | 50.0 ± 70.7 |" in text
    with pytest.raises(DataError, match="iter_2.jsonl: 0 of the 6 held-out problems evaluated"):
        evaluate.runs_comparison([root / "s0"], 2)
