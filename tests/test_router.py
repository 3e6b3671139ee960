"""router.py: the label rule, routing by the words of the problem, determinism, the router's rows,
and its command line without an executor (hand-made rows of the fixed workflows), with headroom.py's
table and report.router_rows picking its rows up. No executor, no model.

    python -m pytest -q tests/test_router.py
"""
import argparse
import json
import zlib

import numpy as np
import pytest

import benchmarks
import config
import headroom
import mixed
import report
import router
from jsonl import DataError, read_jsonl

REVIEW = ["please review the essay on {}", "review my letter about {}", "can you review this poem about {}"]
COMPUTE = ["compute the sum for {}", "please compute the area of {}", "compute how many {} there are"]
TOPICS = ["the sea", "apples", "trains", "the moon", "gardens", "music", "old maps", "winter"]


def train_set():
    """"review" texts: only X is right; "compute" texts: only Y is right (X is cheaper everywhere)."""
    problems, scores, toks = [], {"X": {}, "Y": {}}, {"X": {}, "Y": {}}
    for i, (tpl, good) in enumerate([(t, "X") for t in REVIEW] + [(t, "Y") for t in COMPUTE]):
        for j, topic in enumerate(TOPICS):
            pid = f"p{i}-{j}"
            problems.append({"id": pid, "problem": tpl.format(topic)})
            for b in ("X", "Y"):
                scores[b][pid], toks[b][pid] = float(b == good), 10 if b == "X" else 50
    return problems, scores, toks


def test_routes_held_out_texts_by_their_words():
    problems, scores, toks = train_set()
    r = router.fit(problems, scores, toks)
    assert r.classes == ["X", "Y"] and r.labels["p0-0"] == "X" and r.labels["p3-0"] == "Y"
    held_out = ["review the story of a lighthouse", "please review my song", "compute the total of two bills",
                "compute the volume of a box"]
    assert r.predict(held_out) == ["X", "X", "Y", "Y"]


def test_fitting_is_deterministic():
    problems, scores, toks = train_set()
    a, b = router.fit(problems, scores, toks), router.fit(problems, scores, toks)
    assert np.array_equal(a.weights, b.weights) and np.array_equal(a.bias, b.bias)
    # crc32 hashing: the features do not depend on the process (Python's str hash is salted)
    assert router.design(["Review THE essay"])[1].tolist() == sorted(
        zlib.crc32(g.encode()) % router.DIMS for g in ["review", "the", "essay", "review the", "the essay"])


def test_label_rule():
    pids = ["both", "none", "tie", "only_y"]
    scores = {"X": {"both": 1.0, "none": 0.0, "tie": 1.0, "only_y": 0.0},
              "Y": {"both": 1.0, "none": 0.0, "tie": 1.0, "only_y": 1.0}}
    toks = {"X": {"both": 30, "none": 5, "tie": 20, "only_y": 5}, "Y": {"both": 20, "none": 5, "tie": 20, "only_y": 90}}
    labels, fallback = router.label(pids, scores, toks)
    # Y is right on 3 of 4, X on 2: Y is the best single workflow, the label where none is right
    assert fallback == "Y"
    assert labels == {"both": "Y", "none": "Y", "tie": "X", "only_y": "Y"}  # fewest tokens; a tie: the first listed
    # with X the better single workflow the unsolved problem goes to X
    scores["X"]["only_y"], scores["Y"]["tie"] = 1.0, 0.0
    assert router.label(pids, scores, toks) == ({"both": "Y", "none": "X", "tie": "X", "only_y": "X"}, "X")


def test_route_rows_takes_the_chosen_rows():
    probs = [{"id": "a"}, {"id": "b"}]
    base = {"X": [{"problem_id": "a", "score": 1.0}, {"problem_id": "b", "score": 0.0}],
            "Y": [{"problem_id": "b", "score": 1.0}]}
    assert router.route_rows(probs, {"a": "X", "b": "Y"}, base) == [
        {"problem_id": "a", "score": 1.0, "route": "X"}, {"problem_id": "b", "score": 1.0, "route": "Y"}]
    with pytest.raises(DataError, match="'Y' has no held-out row for problem 'a'"):
        router.route_rows(probs, {"a": "Y", "b": "Y"}, base)


# ---- the command line on hand-made rows ----

CODE = {"io": 'def solve(problem):\n    return custom(problem, "x")\n', "programmer": "def solve(problem):\n    return programmer(problem)\n"}


def write_rows(path, problems, name):
    """programmer right on arith (40 tokens), io right elsewhere (100 tokens), as score_workflow writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({
        "problem_id": p["id"], "score": float((name == "programmer") == (p["kind"] == "arith")), "valid": True,
        "code": CODE[name], "calls": 1, "prompt_tokens": 30 if name == "programmer" else 80,
        "completion_tokens": 10 if name == "programmer" else 20, "cost_usd": 0.0, "seconds": 0.1}) + "\n" for p in problems))


def test_cli_without_executor(tmp_path, capsys):
    tag = report.executor_tag(config.defaults(("collect",)))
    train = mixed.select(benchmarks.load("mixed", "train"), 6)
    test = mixed.select(benchmarks.load("mixed", "test"), 3)
    for b in ("io", "programmer"):
        write_rows(tmp_path / "mixed" / f"train-{tag}" / f"{b}.jsonl", train, b)
    args = ["--table-only", "--train-limit", "6", "--limit", "3", "--out", str(tmp_path), "--baselines", "io,programmer"]
    with pytest.raises(SystemExit) as e:  # the held-out rows are checked first, naming what to run
        router.main(args)
    assert e.value.code == 2 and "python headroom.py --bench mixed --split test --limit 3 --baselines io,programmer" in capsys.readouterr().err
    for b in ("io", "programmer"):
        write_rows(tmp_path / "mixed" / f"test-{tag}" / f"{b}.jsonl", test, b)
    router.main(args)
    out = capsys.readouterr().out
    rows = read_jsonl(tmp_path / "mixed" / f"test-{tag}" / "router.jsonl")
    assert [r["problem_id"] for r in rows] == [p["id"] for p in test]
    assert all(r["route"] == ("programmer" if p["kind"] == "arith" else "io") for r, p in zip(rows, test))
    assert "router: accuracy 100.0 [100.0, 100.0] %, 80 executor tokens/problem, 1.00 calls/problem" in out
    assert "| arith | 3 | 100.0 | programmer 100 % |" in out and "| yesno | 3 | 100.0 | io 100 % |" in out
    # io is the best single workflow (2 kinds of 3) at 100 tokens; the cost oracle spends (40 + 100 + 100) / 3
    assert "| router | 100.0 [100.0, 100.0] | 1.00 | 80 | +1.00 |" in out  # routing is the cost oracle here
    # headroom.py's tables show the router beside the fixed workflows
    headroom.main(["--table-only", "--limit", "3", "--out", str(tmp_path), "--baselines", "io,programmer"])
    table = capsys.readouterr().out
    assert "| router | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] |" in table
    assert "S* (share of the best single workflow's tokens the cost oracle saves): **20.0 %**" in table
    # train rows missing: --table-only says to run without it
    (tmp_path / "mixed" / f"train-{tag}" / "io.jsonl").unlink()
    with pytest.raises(SystemExit):
        router.main(args)
    assert "run this command without --table-only" in capsys.readouterr().err


def test_cli_routes_a_runs_held_out_problems_into_its_report(tmp_path, capsys):
    """--run: the run's held-out problems and its baselines' rows; report.router_rows finds the result."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"bench": "mixed", "eval_problems": 6}))
    cfg = config.merge(run, argparse.Namespace(), ("collect", "eval"))
    probs = benchmarks.load("mixed", "test", limit=6, seed=0)
    train = mixed.select(benchmarks.load("mixed", "train"), 4)
    for b in ("io", "programmer"):
        write_rows(report.baseline_path(cfg, b, "test", 6, run.parent), probs, b)
        write_rows(report.headroom_dir(cfg, "train", tmp_path / "h") / f"{b}.jsonl", train, b)
    router.main(["--run", str(run), "--table-only", "--train-limit", "4", "--out", str(tmp_path / "h"),
                 "--baselines", "io,programmer"])
    assert "held out: the 6 held-out problems of" in capsys.readouterr().out
    rows = report.router_rows(cfg, probs, run.parent)
    assert [r["problem_id"] for r in rows] == [p["id"] for p in probs] and all(r["score"] == 1.0 for r in rows)
    assert report.router_rows(cfg, probs + [{"id": "elsewhere"}], run.parent) is None
