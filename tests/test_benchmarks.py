"""benchmarks.py, scorers.py, download.py: loaders (generated, package, data dir), error paths, scorers on real rows and
hand-made tricky cases. The code scorer runs the real sandbox on a seeded subset of rows."""
import ast
import hashlib
import json
import operator
import re

import pytest

import benchmarks as B
import download
import scorers
from jsonl import DataError
from conftest import SHARED_DATA

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="reference data dir ../shared/data absent")


# ---------------------------------------------------------------------------- arith

def _eval_arith(expr):
    """Independent evaluator: + - * / on ints via the AST; / must be exact."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def ev(n):
        if isinstance(n, ast.Constant):
            return n.value
        a, b = ev(n.left), ev(n.right)
        if isinstance(n.op, ast.Div):
            assert a % b == 0, expr
            return a // b
        return ops[type(n.op)](a, b)
    return ev(ast.parse(expr, mode="eval").body)


WORD_OPS = {"bags with": "*", "rows of": "*", "equally among": "/", "boxes of": "/",  # before "buys"
            "gives away": "-", "took": "-", "buys": "+", "gave": "+"}


def test_arith_sizes_kinds_and_answers():
    rows = {s: B.load("arith", s) for s in B.SPLITS}
    assert len(rows["test"]) >= 500 and len(rows["train"]) >= 2000 and len(rows["validate"]) >= 100
    for split, rs in rows.items():
        assert {(r["kind"], r["level"]) for r in rs} == {(k, l) for k in ("single", "paren", "word") for l in (1, 2, 3)}
        assert len({r["id"] for r in rs}) == len(rs)
        for r in rs:
            if r["kind"] == "word":  # numbers of the text, the operation from the template's wording
                a, b = map(int, re.findall(r"\d+", r["problem"]))
                op = next(o for k, o in WORD_OPS.items() if k in r["problem"])
                want = _eval_arith(f"{a} {op} {b}")
            else:
                want = _eval_arith(re.fullmatch(r"What is (.+)\?", r["problem"]).group(1))
            assert r["answer"] == str(want) and want >= 0, r


def test_arith_splits_disjoint_by_expression_and_text():
    keys = {s: {r["expr"].replace(" ", "") for r in B.load("arith", s)} for s in B.SPLITS}
    texts = {s: {r["problem"] for r in B.load("arith", s)} for s in B.SPLITS}
    for a, b in (("train", "test"), ("train", "validate"), ("validate", "test")):
        assert not keys[a] & keys[b] and not texts[a] & texts[b]
    # the split is a function of the expression alone
    assert all(B.arith_split(k) == s for s in B.SPLITS for k in keys[s])


def test_arith_deterministic_and_pinned():
    a, b = B.load("arith", "test"), B.arith("test")
    assert a == b
    # golden: pins the generator across machines / Python versions
    digest = hashlib.sha256(json.dumps([x["problem"] + "=" + x["answer"] for x in a]).encode()).hexdigest()[:16]
    assert a[1]["problem"] == "What is 8121 - 1147?"
    assert digest == "bdf4414e97aa3250"


def test_limit_is_seeded_nested_subset():
    full = B.load("arith", "train")
    s10, s20 = B.load("arith", "train", limit=10, seed=3), B.load("arith", "train", limit=20, seed=3)
    assert len(s10) == 10 and len(s20) == 20
    assert {r["id"] for r in s10} < {r["id"] for r in s20}
    assert s10 == B.load("arith", "train", limit=10, seed=3)
    assert {r["id"] for r in s10} != {r["id"] for r in B.load("arith", "train", limit=10, seed=4)}
    order = [r["id"] for r in full]
    assert [order.index(r["id"]) for r in s20] == sorted(order.index(r["id"]) for r in s20)


def test_draw_by_kind_takes_the_kinds_in_turn():
    """--draw kind: 10 of mixed's 3 kinds are 4, 3, 3 for every seed, nested like the plain subset,
    and each kind's rows are the ones its own hash order picks first (a naive per-kind reference)."""
    full = B.load("mixed", "train")
    for seed in range(4):
        rows = B.load("mixed", "train", limit=10, seed=seed, by_kind=True)
        counts = sorted(sum(r["kind"] == k for r in rows) for k in ("arith", "sentiment", "yesno"))
        assert counts == [3, 3, 4]
        for kind in ("arith", "sentiment", "yesno"):
            own = sorted((r for r in full if r["kind"] == kind), key=lambda r: B.stable_hash(f"{seed}:{r['id']}"))
            picked = {r["id"] for r in rows if r["kind"] == kind}
            assert picked == {r["id"] for r in own[:len(picked)]}
        assert {r["id"] for r in rows} < {r["id"] for r in B.load("mixed", "train", limit=13, seed=seed, by_kind=True)}
    assert B.take_turns([1, 2, 3, 4, 5, 6], "aabacc") == [1, 3, 5, 2, 6, 4]
    with pytest.raises(DataError, match="--draw kind.*gsm8k"):
        B.load("gsm8k", "train", limit=5, by_kind=True)  # the package copy: no kinds


def test_family_and_unknown_names():
    assert B.family("arith") == "math" and B.family("drop") == "qa" and B.family("mbpp") == "code"
    with pytest.raises(DataError, match="unknown benchmark"):
        B.load("nope", "test")
    with pytest.raises(DataError, match="unknown split"):
        B.load("arith", "dev")


# ---------------------------------------------------------------------------- packages

def test_gsm8k_package_split_1_to_4_and_gold_scores():
    val, test = B.load("gsm8k", "validate", data_dir=None), B.load("gsm8k", "test")
    assert (len(val), len(test)) == (264, 1055)
    assert not {r["id"] for r in val} & {r["id"] for r in test}
    assert B.load("gsm8k", "train") == val  # train = validate, as in the papers
    for r in val + test:
        assert B.score("gsm8k", r, f"... so the answer is {r['answer']}.") == 1.0
        assert B.score("gsm8k", r, str(float(r["answer"]) + 1)) == 0.0


def test_humaneval_package_matches_shared_split_ids():
    val, test = B.load("humaneval", "validate"), B.load("humaneval", "test")
    assert (len(val), len(test)) == (33, 131)
    assert {int(r["id"].split("/")[1]) for r in val} == B.HUMANEVAL_VALIDATE
    if SHARED_DATA.is_dir():
        shared = {B.humaneval_id(json.loads(l)["task_id"]) for l in open(SHARED_DATA / "humaneval_validate.jsonl")}
        assert shared == {r["id"] for r in val}


def test_doctest_public_tests_pass_on_canonical_solutions():
    sandbox = pytest.importorskip("sandbox")
    rows = B.load("humaneval", "validate") + B.load("humaneval", "test")
    with_tests = [r for r in rows if r["public_tests"]]
    assert len(with_tests) >= 130
    # these docstrings' examples disagree with the reference solution (upstream HumanEval errata)
    known_wrong = {"HumanEval/47", "HumanEval/116", "HumanEval/130", "HumanEval/148"}
    failed = set()
    for r in with_tests:
        assert all(t.startswith("assert candidate(") for t in r["public_tests"])
        prog = f"{r['prompt']}{r['canonical_solution']}\ncandidate = {r['entry_point']}\n" + "\n".join(r["public_tests"])
        if not sandbox.run_program(prog, timeout=10)["ok"]:
            failed.add(r["id"])
    assert failed <= known_wrong


@needs_shared
def test_mbpp_public_tests_pass_on_reference_code():
    sandbox = pytest.importorskip("sandbox")
    rows = B.load("mbpp", "test", data_dir=SHARED_DATA) + B.load("mbpp", "validate", data_dir=SHARED_DATA)
    rows = [r for r in rows if r["test_imports"]][:6] + [r for r in rows if not r["test_imports"]][:10]
    for r in rows:
        assert len(r["public_tests"]) == 1 and "candidate(" in r["public_tests"][0]
        prog = f"{r['canonical_solution']}\ncandidate = {r['entry_point']}\n{r['public_tests'][0]}\n"
        assert sandbox.run_program(prog, timeout=10)["ok"], r["id"]


def test_doctest_formats():
    p = ('def f(x):\n    """\n    >>> f(2)\n    4\n    f(3) ==> 9\n    f(1) ➞ 1\n    f(true) == 1\n'
         '    For x = 5 the output should be 25.\n    """\n')
    assert B.doctest_asserts(p, "f", limit=10) == ["assert candidate(2) == 4", "assert candidate(3) == 9",
                                                   "assert candidate(1) == 1", "assert candidate(5) == 25"]


# ---------------------------------------------------------------------------- data dirs

@needs_shared
@pytest.mark.parametrize("name,split,n", [("gsm8k", "validate", 264), ("gsm8k", "test", 1055), ("math", "validate", 119),
                                          ("math", "test", 486), ("humaneval", "test", 131), ("mbpp", "validate", 86),
                                          ("mbpp", "test", 341), ("hotpotqa", "validate", 200), ("drop", "test", 400)])
def test_data_dir_loads(name, split, n):
    rows = B.load(name, split, data_dir=SHARED_DATA)
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert all(isinstance(r["problem"], str) and r["problem"] for r in rows)


def test_data_dir_env_and_package_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOGW_DATA", str(tmp_path))
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({"question": "q?", "answer": "1,234", "id": "x"}) + "\n")
    assert B.load("gsm8k", "test") == [{"id": "x", "problem": "q?", "answer": "1234"}]
    assert len(B.load("gsm8k", "validate")) == 264  # env dir lacks it: the package
    with pytest.raises(DataError, match="gsm8k_validate.jsonl"):
        B.load("gsm8k", "validate", data_dir=tmp_path)  # an explicit dir must hold the file


def test_missing_and_malformed_files_name_path_and_line(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "math_test.jsonl")) + ".*not found"):
        B.load("math", "test", data_dir=tmp_path)
    good = json.dumps({"problem": "p", "solution": "so \\boxed{2}"})
    (tmp_path / "math_test.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(DataError, match=r"math_test\.jsonl:3: malformed JSON"):
        B.load("math", "test", data_dir=tmp_path)
    (tmp_path / "math_test.jsonl").write_text(good + "\n" + json.dumps({"problem": "p"}) + "\n")
    with pytest.raises(DataError, match=r"math_test\.jsonl:2: missing field 'solution'"):
        B.load("math", "test", data_dir=tmp_path)
    (tmp_path / "math_test.jsonl").write_text(json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(DataError, match=r"math_test\.jsonl:1: .*boxed"):
        B.load("math", "test", data_dir=tmp_path)
    assert issubclass(DataError, ValueError)


def test_cli_show_and_exit_2(tmp_path, capsys):
    assert B.main(["show", "arith", "--split", "test", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count('"id": "arith-test-') == 2
    with pytest.raises(SystemExit) as e:
        B.main(["show", "math", "--split", "test", "--data-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "math_test.jsonl" in capsys.readouterr().err


def test_download_offline_fails_cleanly(tmp_path, capsys):
    # port 9 (discard) on loopback: refused at once, no network needed
    with pytest.raises(SystemExit) as e:
        download.main(["gsm8k", "--to", str(tmp_path), "--url", "http://127.0.0.1:9/test.jsonl"])
    assert e.value.code == 2
    assert "cannot download http://127.0.0.1:9/test.jsonl" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_download_converts_to_the_data_dir_layout(tmp_path, monkeypatch):
    gsm = "".join(json.dumps({"question": f"q{i}?", "answer": f"work\n#### {i},000"}) + "\n" for i in range(10))
    mbpp = json.dumps([{"task_id": i, "prompt": "Write f.", "code": f"def f{i}(x):\n    return x",
                        "test_imports": [], "test_list": [f"assert f{i}(1) == 1"]} for i in range(10)])
    payload = {"gsm8k": gsm.encode(), "mbpp": mbpp.encode()}
    for name in payload:
        monkeypatch.setattr(download, "_fetch", lambda url, name=name: payload[name])
        download.download(name, tmp_path)
        val, test = B.load(name, "validate", data_dir=tmp_path), B.load(name, "test", data_dir=tmp_path)
        assert (len(val), len(test)) == (2, 8) and not {r["id"] for r in val} & {r["id"] for r in test}
    r = B.load("gsm8k", "test", data_dir=tmp_path)[0]
    assert r["answer"] == str(int(r["problem"][1:-1])) + "000"
    r = B.load("mbpp", "test", data_dir=tmp_path)[0]
    assert r["public_tests"] == ["assert candidate(1) == 1"] and r["problem"].endswith(f"def {r['entry_point']}(x):")


# ---------------------------------------------------------------------------- scorers: real rows

@needs_shared
def test_math_gold_scores_1_and_perturbed_0():
    rows = B.load("math", "validate", data_dir=SHARED_DATA) + B.load("math", "test", data_dir=SHARED_DATA)
    for r in rows:
        assert B.score("math", r, r["solution"]) == 1.0, r["answer"]
        assert B.score("math", r, r["answer"]) == 1.0, r["answer"]  # a bare final answer (format())
    numeric = [r for r in rows if re.fullmatch(r"-?\d+", r["answer"])]
    assert len(numeric) > 200
    for r in numeric:
        assert B.score("math", r, f"\\boxed{{{int(r['answer']) + 1}}}") == 0.0


@needs_shared
def test_qa_gold_scores_1_and_unrelated_0():
    for r in B.load("drop", "validate", data_dir=SHARED_DATA):
        for gold in r["answer"].split("|"):
            assert B.score("drop", r, gold) == 1.0
        assert B.score("drop", r, "zzqx") == 0.0
    for r in B.load("hotpotqa", "validate", data_dir=SHARED_DATA):
        assert B.score("hotpotqa", r, r["answer"]) == 1.0 and B.score("hotpotqa", r, "zzqx") == 0.0


@needs_shared
def test_gsm8k_data_dir_gold():
    for r in B.load("gsm8k", "test", data_dir=SHARED_DATA, limit=200):
        assert B.score("gsm8k", r, f"The answer is ${r['answer']}.") == 1.0
        assert B.score("gsm8k", r, f"{float(r['answer']) - 1}") == 0.0


def _code_rows():
    rows = [("humaneval", r, f"```python\n{r['prompt']}{r['canonical_solution']}```")
            for r in B.load("humaneval", "test", limit=8, seed=1)]
    rows += [("humaneval", r, r["canonical_solution"]) for r in B.load("humaneval", "validate", limit=3)]  # body only
    if SHARED_DATA.is_dir():
        rows += [("humaneval", r, r["prompt"] + r["canonical_solution"])
                 for r in B.load("humaneval", "validate", data_dir=SHARED_DATA, limit=3)]
        # mbpp-630's reference code is itself broken upstream (an undefined name)
        rows += [("mbpp", r, r["canonical_solution"]) for r in B.load("mbpp", "test", data_dir=SHARED_DATA, limit=9, seed=2)
                 if r["id"] != "mbpp-630"]
    return rows


def test_code_scorer_runs_hidden_tests_in_sandbox():
    pytest.importorskip("sandbox")
    for name, r, gold in _code_rows():
        assert B.score(name, r, gold) == 1.0, r["id"]
        stub = f"def {r['entry_point']}(*args, **kwargs):\n    return None\n"
        assert B.score(name, r, stub) == 0.0, r["id"]
        assert B.score(name, r, "") == 0.0


def test_code_program_check_call():
    he = {"entry_point": "f", "prompt": "def f(x):\n    '''doc'''\n", "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    mb = {"entry_point": "f", "test_imports": ["import math"], "test": "def check():\n    assert f(1) == 2\n"}
    assert scorers.code_program(he, "def f(x):\n    return x + 1").rstrip().endswith("check(f)")
    prog = scorers.code_program(mb, "```python\ndef f(x):\n    return x + 1\n```")
    assert prog.startswith("import math") and prog.rstrip().endswith("check()") and "```" not in prog
    ns = {}
    exec(scorers.code_program(he, "    return x + 1\n"), ns)  # a bare body completes the prompt's def


# ---------------------------------------------------------------------------- scorers: tricky cases

@pytest.mark.parametrize("answer,gold,want", [
    ("1,000", "1000", 1), ("$18.00", "18", 1), ("It costs $18.01", "18", 0), ("50%", "50", 1), ("3.0", "3", 1),
    ("x = 7 then 12", "12", 1), ("-5", "-5", 1), ("The answer: 5.", "-5", 0), ("no number", "3", 0),
    ("1,234,567.5", "1234567.5", 1), (".5", "0.5", 1),
])
def test_numeric_scorer(answer, gold, want):
    assert B.score("gsm8k", {"answer": gold}, answer) == want
    assert B.score("arith", {"answer": gold}, answer) == want


@pytest.mark.parametrize("answer,gold,want", [
    ("\\frac{1}{2}", "0.5", 1), ("0.5", "\\frac12", 1), ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}", 1), ("so the answer is (B).", "B", 1), ("\\boxed{C}", "\\text{(B)}", 0),
    ("\\boxed{5\\text{ cm}^2}", "5", 1), ("\\boxed{30^\\circ}", "30", 1), ("\\boxed{30 degrees}", "30", 1),
    ("\\boxed{x = 5}", "5", 1), ("\\boxed{\\$18.00}", "18", 1), ("\\boxed{10\\%}", "10", 1),
    ("\\boxed{1,\\!000}", "1000", 1), ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1), ("\\boxed{(2,1)}", "(1,2)", 0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", 1), ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1), ("\\boxed{x^2+2x+2}", "(x+1)^2", 0), ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", 1),
    ("\\boxed{\\sqrt[3]{8}}", "2", 1), ("\\boxed{9^{9^{9}}}", "1", 0), ("\\boxed{__import__('os')}", "1", 0),
    ("first \\boxed{3} then \\boxed{\\frac{7}{2}}", "3.5", 1), ("\\boxed{{4}}", "4", 1), ("", "4", 0),
])
def test_math_scorer(answer, gold, want):
    assert B.score("math", {"answer": gold}, answer) == want


def test_last_boxed_nested():
    assert scorers.last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{\\sqrt{b}}} c") == "\\frac{a}{\\sqrt{b}}"
    assert scorers.last_boxed("\\fbox{7}") == "7" and scorers.last_boxed("\\boxed 5$") == "5"
    assert scorers.last_boxed("\\boxed{unclosed") is None and scorers.last_boxed("none") is None


def test_f1_squad_normalisation_and_partial_credit():
    assert scorers.f1("The Eiffel Tower!", "eiffel tower") == 1.0
    assert scorers.f1("Eiffel", "Eiffel Tower") == pytest.approx(2 / 3)
    assert scorers.f1("paris france", "paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert scorers.f1("", "x") == 0.0 and scorers.f1("the", "a") == 1.0  # both empty after normalisation
    row = {"answer": "Hernán Peraza The Elder|Hernán Peraza"}
    assert B.score("drop", row, "Hernán Peraza") == 1.0
    assert B.score("drop", row, "Peraza") == pytest.approx(2 / 3)
    assert B.score("hotpotqa", {"answer": "1958"}, "In 1958.") == pytest.approx(2 / 3)
