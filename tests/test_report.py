"""report.py: the per-kind table, the headroom against a hand calculation, operator sequences, and
the figures, on hand-made held-out rows.

    python -m pytest -q tests/test_report.py
"""
import json
import statistics

import benchmarks
import config
import report


def rows(scores, code="def solve(problem):\n    return programmer(problem)\n", valid=True):
    return [{"problem_id": p, "score": s, "valid": valid, "code": code, "prompt_tokens": 0, "completion_tokens": 0,
             "cost_usd": 0.0, "seconds": 0.0} for p, s in scores.items()]


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
    assert "| 1 | (invalid) (50 %) | custom (100 %) |" in text  # a tie: the first seen
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
                   "![update curves: loss, KL, clip fraction](training.png)"]
    for name in ("accuracy.png", "kinds.png", "training.png"):
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
    text = report.write(run, cfg, 0, 60.0, baselines={"io": report.summarize(rows({p: 1.0 for p in sc}))}).read_text()
    assert "## Per kind" in text and "## Figures" in text and (run / "accuracy.png").is_file()
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
    lines = report.groups_section(tmp_path, dict(config.defaults(), bench="mixed"), 1)
    assert lines[2:] == ["| 0 | arith | 1/2 | programmer (+1.00, 1) | custom (-1.00, 1) |",
                         "| 0 | sentiment | 1/1 | custom (+1.00, 1) | programmer (-1.00, 1) |"]
