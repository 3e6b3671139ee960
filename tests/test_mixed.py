"""mixed.py: deterministic generation, disjoint splits, per-kind scorers on right and wrong answers;
the headroom (report.headroom, headroom.py) on hand-made rows against a naive calculation. No executor."""
import json
import random
import re
import statistics
import subprocess
import sys

import pytest

import benchmarks
import headroom
import mixed
import operators
import report
import workflow
from conftest import ROOT
from jsonl import DataError


def load(split):
    return mixed.load(split, benchmarks.arith(split))


def test_generation_is_deterministic_and_pinned():
    first = load("test")
    mixed._kind_rows.cache_clear()  # regenerate from the seed, not from the cache
    assert load("test") == first
    # golden: pins the generators (random.Random(int) streams) across machines and Python versions
    assert [(r["id"], r["answer"]) for r in first[:3]] == [
        ("mixed-test-arith-0000", "6974"), ("mixed-test-sentiment-0000", "positive"), ("mixed-test-yesno-0000", "no")]
    assert first[2]["problem"] == "Raj has a brown house and a black cat. Is Raj's house red? Answer yes or no."
    train = load("train")
    assert [(r["id"], r["answer"]) for r in train[:3]] == [
        ("mixed-train-arith-0000", "1"), ("mixed-train-sentiment-0000", "negative"), ("mixed-train-yesno-0000", "yes")]


def _key(r):
    return r["kind"], r.get("key", r.get("expr"))


def test_splits_sizes_and_disjoint():
    rows = {s: load(s) for s in mixed.SPLITS}
    for s, want in mixed.SIZES.items():
        assert len(rows[s]) == want * len(mixed.KINDS)
        assert {k: sum(r["kind"] == k for r in rows[s]) for k in mixed.KINDS} == {k: want for k in mixed.KINDS}
        assert len({r["id"] for r in rows[s]}) == len(rows[s])
        assert len({_key(r) for r in rows[s]}) == len(rows[s])  # no duplicate problem inside a split
    keys = {s: {_key(r) for r in rows[s]} for s in mixed.SPLITS}
    for a, b in (("train", "test"), ("train", "validate"), ("validate", "test")):
        assert not keys[a] & keys[b]
    # the same holds for the problem texts
    texts = {s: {r["problem"] for r in rows[s]} for s in mixed.SPLITS}
    assert not texts["train"] & texts["test"] and not texts["validate"] & texts["test"]


def test_rows_are_well_formed_and_balanced():
    rows = load("train")
    for r in rows:
        assert r["kind"] in mixed.KINDS and r["problem"] and r["answer"]
        assert "Answer" in r["problem"]  # the problem says how to answer
        if r["kind"] == "arith":
            assert float(r["answer"]) == eval(r["expr"], {"__builtins__": {}})  # an independent check
            assert r["problem"] == f"What is {r['expr']}? Answer with a number." and r["form"] in ("single", "paren")
        elif r["kind"] == "yesno":  # the asked color is the stated one exactly when the answer is yes
            pattern = r"(\w+) has an? (\w+) (\w+) and an? (\w+) (\w+)\. Is \1's (\w+) (\w+)\? Answer yes or no\."
            n, c1, t1, c2, t2, tq, asked = re.fullmatch(pattern, r["problem"]).groups()
            assert tq in (t1, t2) and t1 != t2
            assert r["answer"] == ("yes" if asked == (c1 if tq == t1 else c2) else "no")
        else:
            assert r["answer"] in r["options"] and f"Answer {' or '.join(r['options'])}." in r["problem"]
            adj = re.search(r"\b(\w+)\.(?: [^\n]*)?\"\n", r["problem"]).group(1)
            assert adj in (mixed.POSITIVE if r["answer"] == "positive" else mixed.NEGATIVE)
    for kind, label in (("sentiment", "positive"), ("yesno", "yes")):
        answers = [r["answer"] for r in rows if r["kind"] == kind]
        assert 0.45 < answers.count(label) / len(answers) < 0.55
    assert len(set(mixed.POSITIVE) | set(mixed.NEGATIVE)) == len(mixed.POSITIVE) + len(mixed.NEGATIVE)


def test_load_and_score_through_benchmarks():
    # its own prompt (a label and an arithmetic example), math's operators and fixed workflows
    assert benchmarks.family("mixed") == "mixed"
    assert operators.OPERATOR_SETS["mixed"] == operators.OPERATOR_SETS["math"]
    assert workflow.BASELINES["mixed"] == workflow.BASELINES["math"]
    shots = [code for _, code in workflow.FEWSHOT["mixed"]]
    assert any("programmer(" not in c for c in shots) and any("programmer(" in c for c in shots)
    problem = load("test")[1]["problem"]
    msgs = workflow.build_prompt(problem, "mixed")
    assert problem in msgs[-1]["content"] and msgs[-1]["content"].endswith("it must not solve the problem itself.")
    sub = benchmarks.load("mixed", "test", limit=20, seed=0)
    assert len(sub) == 20 and sub == benchmarks.load("mixed", "test", limit=20, seed=0)
    assert {r["id"] for r in sub} <= {r["id"] for r in load("test")}
    row = next(r for r in load("test") if r["kind"] == "arith")
    assert benchmarks.score("mixed", row, f"The answer is {row['answer']}") == 1.0
    assert benchmarks.score("mixed", row, None) == 0.0
    with pytest.raises(DataError, match="split"):
        mixed.load("dev", [])


ARITH = {"kind": "arith", "answer": "42"}
SENTI = {"kind": "sentiment", "answer": "positive", "options": ["positive", "negative"]}
YESNO = {"kind": "yesno", "answer": "no", "options": ["yes", "no"]}


@pytest.mark.parametrize("row, answer, want", [
    (ARITH, "42", 1), (ARITH, "The answer is 42", 1), (ARITH, "**42**", 1), (ARITH, "42.0", 1), (ARITH, "$42", 1),
    (ARITH, "Answer: 43", 0), (ARITH, "42 + 1 = 43", 0), (ARITH, "", 0), (ARITH, "forty-two", 0),
    (SENTI, "positive", 1), (SENTI, "Positive.", 1), (SENTI, "**positive**", 1), (SENTI, "The answer is positive", 1),
    (SENTI, "The review is glowing.\nAnswer: Positive", 1), (SENTI, "'positive'", 1),
    (SENTI, "Positive, the reviewer liked it; it is not negative", 1),  # starts with the answer
    (SENTI, "Negative. The review is not positive.", 0), (SENTI, "positive/negative", 0),
    (SENTI, "negative", 0), (SENTI, "Negative.", 0), (SENTI, "The answer is negative", 0),
    (SENTI, "positive or negative", 0), (SENTI, "It could be either.", 0), (SENTI, "", 0), (SENTI, None, 0),
    (SENTI, "The review mentions positive words.\nAnswer: negative", 0),  # the final answer counts
    (SENTI, "positively", 0),  # whole words only
    (YESNO, "no", 1), (YESNO, "No.", 1), (YESNO, "**no**", 1), (YESNO, "NO", 1), (YESNO, "The answer is no", 1),
    (YESNO, "No, Raj's lamp is gray.", 1), (YESNO, "Step 1: yes, it is a lamp.\nAnswer: No", 1),
    (YESNO, "Yes.", 0), (YESNO, "**yes**", 0), (YESNO, "The answer is yes", 0), (YESNO, "yes or no", 0),
    (YESNO, "nothing", 0), (YESNO, "Yes, no doubt.", 0), (YESNO, "", 0),
])
def test_scorers(row, answer, want):
    assert mixed.score(row, answer) == want


def test_score_unknown_kind():
    with pytest.raises(DataError, match="unknown mixed kind"):
        mixed.score({"id": "x", "kind": "poem", "answer": "a"}, "a")


# ------------------------------------------------------------------------------------------ headroom

def _hand_rows():
    """3 baselines x 2 kinds x 4 problems: 'a' wins kind x, 'b' wins kind y, 'c' is middling."""
    kinds = {f"x{i}": "x" for i in range(4)} | {f"y{i}": "y" for i in range(4)}
    scores = {"a": dict(zip(kinds, [1, 1, 1, 0, 0, 0, 1, 0])),
              "b": dict(zip(kinds, [0, 0, 0, 0, 1, 1, 1, 1])),
              "c": dict(zip(kinds, [1, 0, 1, 0, 1, 0, 1, 0]))}
    return {b: {p: float(v) for p, v in s.items()} for b, s in scores.items()}, kinds


def _naive_ci(xs, reps=2000, seed=0):
    rng = random.Random(seed)
    means = []
    for _ in range(reps):
        idx = [int(rng.random() * len(xs)) for _ in xs]  # what random.choices draws
        means.append(sum(xs[i] for i in idx) / len(xs))
    means.sort()
    return means[int(0.025 * reps)], means[int(0.975 * reps)]


def test_headroom_against_hand_calculation():
    scores, kinds = _hand_rows()
    res = report.headroom(scores, kinds)
    # by hand: a = 3/4 on x, 1/4 on y, 4/8 overall; b = 0, 1, 4/8; c = 2/4, 2/4, 4/8
    assert res["cells"]["a", "x"][0] == 0.75 and res["cells"]["a", "y"][0] == 0.25
    assert res["cells"]["b", "y"][0] == 1.0 and res["cells"]["c", "overall"][0] == 0.5
    assert res["best"] == "a"  # all tie at 0.5 overall: the first baseline in order
    assert res["choice"] == {"x": "a", "y": "b"}
    # oracle: a's scores on x problems + b's on y = (3 + 4) / 8
    assert res["oracle"][0] == 7 / 8 and res["single"][0] == 0.5
    assert res["headroom"][0] == pytest.approx(3 / 8)
    single = [scores["a"][p] for p in kinds]
    oracle = [scores["a"][p] if kinds[p] == "x" else scores["b"][p] for p in kinds]
    assert res["single"][1:] == pytest.approx(_naive_ci(single))
    assert res["oracle"][1:] == pytest.approx(_naive_ci(oracle))
    assert res["headroom"][1:] == pytest.approx(_naive_ci([o - s for o, s in zip(oracle, single)]))
    assert res["cells"]["c", "x"][1:] == pytest.approx(_naive_ci([1.0, 0.0, 1.0, 0.0]))
    assert res["disjoint"] == (res["oracle"][1] > res["single"][2])
    text = "\n".join(report.headroom_table(res))
    assert "| a | 75.0 [" in text and "by-kind oracle (x: a, y: b): 87.5 [" in text
    assert "+37.5 points" in text


def test_headroom_same_problems_resampled():
    # bootstrap_ci resamples the same problem indices for any two lists of one length: a baseline
    # that is b plus one point on every problem has its CI shifted by exactly that point
    rng = random.Random(1)
    b = [float(rng.random() < 0.4) for _ in range(60)]
    lo, hi = report.bootstrap_ci(b)
    lo2, hi2 = report.bootstrap_ci([x + 1 for x in b])
    assert (lo2 - lo, hi2 - hi) == pytest.approx((1, 1))


def test_headroom_disjoint_and_best():
    kinds = {f"p{i}": ("x" if i < 50 else "y") for i in range(100)}
    scores = {"io": {p: float(k == "y") for p, k in kinds.items()},
              "programmer": {p: float(k == "x" and int(p[1:]) % 5 != 0) for p, k in kinds.items()}}
    res = report.headroom(scores, kinds)
    assert res["best"] == "io" and res["choice"] == {"x": "programmer", "y": "io"}
    assert res["single"][0] == 0.5 and res["oracle"][0] == statistics.fmean([0.8, 1.0])
    assert res["disjoint"]


def test_headroom_missing_scores_and_select():
    scores, kinds = _hand_rows()
    del scores["b"]["y3"]
    with pytest.raises(DataError, match="'b'.*y3"):
        report.headroom(scores, kinds)
    rows = [{"id": i, "kind": k} for i, k in enumerate("xxyxyyx")]
    assert [r["id"] for r in headroom.select(rows, 2)] == [0, 1, 2, 4]
    with pytest.raises(DataError, match="kind"):
        headroom.select([{"id": 1}], 2)


@pytest.mark.parametrize("args, msg", [(["--limit", "0"], "--limit"), (["--baselines", "io,magic"], "--baselines"),
                                       (["--bench", "gsm9k"], "gsm9k")])
def test_headroom_cli_bad_input(tmp_path, args, msg):
    r = subprocess.run([sys.executable, str(ROOT / "headroom.py"), "--table-only", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and msg in r.stderr


def test_headroom_table_only_from_cached_rows(tmp_path, capsys):
    # rows as run_baseline writes them, for the first 2 problems of each kind; a third baseline
    # with one problem missing is left out of the table, rows of other problems are ignored
    problems = headroom.select(load("test"), 2)
    root = tmp_path / "mixed" / "test-local-cap160"
    root.mkdir(parents=True)
    io = {p["id"]: float(p["kind"] != "arith") for p in problems}
    prog = {p["id"]: float(p["kind"] == "arith" and p["id"].endswith("0")) for p in problems}
    for name, scores in (("io", io), ("programmer", prog), ("cot", dict(list(io.items())[1:]))):
        rows = [{"problem_id": pid, "kind": pid.split("-")[2], "score": s} for pid, s in scores.items()]
        rows.append({"problem_id": "mixed-test-arith-0099", "kind": "arith", "score": 1.0})
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    headroom.main(["--table-only", "--limit", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out == (root / "table.md").read_text()  # printed and written alike
    assert "| io |" in out and "| programmer |" in out and "| cot |" not in out
    # io: 4 of 6 right; oracle: programmer's 1 of 2 on arith + io's 4 on the rest = 5 of 6
    assert "best single fixed workflow: **io**, 66.7 [" in out
    assert "by-kind oracle (arith: programmer, sentiment: io, yesno: io): 83.3 [" in out
    assert "**+16.7 points**" in out
