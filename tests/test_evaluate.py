"""evaluate.py's summary (the bootstrap CI and the row order it is computed on) and its held-out size."""
import argparse
import json
import random

import pytest

from jsonl import DataError
import config
import evaluate
import report
import rollout


def row(pid, score):
    return {"problem_id": pid, "score": score, "valid": True, "calls": 1, "prompt_tokens": 1, "completion_tokens": 2,
            "cost_usd": 0.0, "seconds": 0.5}


def test_bootstrap_ci_brackets_the_mean_and_is_exact_on_constants():
    assert report.bootstrap_ci([1.0] * 50) == (1.0, 1.0)
    scores = [1.0] * 39 + [0.0] * 61
    lo, hi = report.bootstrap_ci(scores)
    # normal approximation of the 95 % interval of a proportion: 0.39 +- 1.96 * sqrt(.39 * .61 / 100) = +-0.096
    assert lo < 0.39 < hi and abs((hi - lo) - 0.19) < 0.04
    assert report.bootstrap_ci(scores) == (lo, hi)  # seeded


def test_summary_does_not_depend_on_the_order_rows_finished(tmp_path):
    problems = [{"id": f"p{i}"} for i in range(40)]
    rows = [row(p["id"], float(i % 3 == 0)) for i, p in enumerate(problems)] + [row("other", 1.0)]
    out = []
    for seed in range(3):  # rows are appended as workflows finish: any order
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        f = tmp_path / f"eval{seed}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in shuffled))
        got = rollout.finish(f, problems)
        assert [r["problem_id"] for r in got] == [p["id"] for p in problems]  # problem order, "other" left out
        out.append(report.summarize(got))
        # compare_table summarizes a file's rows as they stand
        assert report.summarize([r for r in shuffled if r["problem_id"] != "other"]) == out[0]
    assert out[0] == out[1] == out[2] and out[0]["n"] == 40 and out[0]["accuracy"] == pytest.approx(14 / 40)
    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    with pytest.raises(DataError, match="short.jsonl: expected 40 problems, found 10"):
        rollout.finish(f, problems)


def test_a_runs_evaluation_defaults_to_its_own_held_out_size(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"bench": "arith", "eval_problems": 3}))
    (run / "eval" / "iter_0.jsonl").write_text("".join(json.dumps(row(f"p{i}", 1.0)) + "\n" for i in range(3)))
    cfg = config.merge(run, argparse.Namespace(), ("run", "collect", "refine"))
    base = report.baseline_path(cfg, "io", "test", 3, run.parent)  # what a 3-problem run's report reads
    base.parent.mkdir(parents=True)
    base.write_text("".join(json.dumps(row(f"p{i}", 0.0)) + "\n" for i in range(3)))
    evaluate.main(["--run", str(run), "--compare"])
    out = capsys.readouterr().out
    assert "| generator iter_0 | 3 |" in out and "| baseline io | 3 |" in out
