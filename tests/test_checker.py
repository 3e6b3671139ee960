"""operators.py checker section: check_workflow, extract_code, build_prompt, few-shot examples.
No model and no sandbox: the static call count is compared with a naive reference that runs the
(trusted, test-written) workflow with counting stub operators."""
import pytest

import benchmarks
import operators
import scorers
import workflow

P = "Tom has 23 apples and buys 19 more. How many apples does he have now?"
MATH = operators.OPERATOR_SETS["math"]


def ok(code, problem=P, **kw):
    return workflow.check_workflow(code, problem, allowed_ops=kw.pop("ops", MATH), **kw)


def test_few_shot_examples_and_prefills_pass_the_checker():
    for fam, shots in workflow.FEWSHOT.items():
        assert shots[-1][1] == workflow.EXAMPLE_WORKFLOWS[fam]
        body_start = workflow.PREFILLS[fam][len("```python\n"):]
        for problem, code in shots:
            assert ok(code, problem, ops=operators.OPERATOR_SETS[fam], max_calls=6) == (True, "ok"), code
            assert code.startswith(body_start)  # the examples begin the way a prefilled completion does
        assert scorers.extract_code(workflow.PREFILLS[fam] + "x)]\n    return drafts[0]\n```") is not None
    for name in benchmarks.FAMILY:  # every benchmark's family has a prompt, a prefill, operators and baselines
        fam = benchmarks.family(name)
        assert fam in workflow.FEWSHOT and fam in workflow.PREFILLS and fam in operators.OPERATOR_SETS
        assert set(workflow.BASELINES[fam]) >= {"io", "cot", "cot_sc", "self_refine"}


@pytest.mark.parametrize("code,reason", [
    ("import os\ndef solve(problem):\n    return custom(problem, 'x')", "import not allowed (line 1)"),
    ("def solve(problem):\n    from os import path\n    return custom(problem, 'x')", "import not allowed (line 2)"),
    ("def solve(problem):\n    return custom(problem.__class__, 'x')", "attribute __class__ not allowed (line 2)"),
    ("def solve(problem):\n    x = __builtins__\n    return custom(problem, 'x')", "dunder name __builtins__ not allowed (line 2)"),
    ("def solve(problem):\n    x = custom(problem, 'x')\n    return f'{x.__doc__}'", "attribute __doc__ not allowed (line 3)"),
    ("def solve(problem):\n    return problem.strip()", "no operator call"),
    ("def solve(problem):\n    return custom(problem, 'x') + str(23)", "literal 23 copied from the problem (line 2)"),
    ("def solve(problem):\n    return custom(problem, 'Add 23 and 19')", "literal 23 copied from the problem (line 2)"),
    ("def solve(problem):\n    return custom('buys 19 more', 'x')", "string 'buys 19 more' copied from the problem (line 2)"),
    ("def solve(problem):\n    return ensemble(problem, [custom(problem, 'x') for _ in range(10)])",
     "too many operator calls (11 > 10)"),
    ("def solve(problem):\n    r = []\n    for i in range(3):\n        for j in range(4):\n            r.append(custom(problem, 'x'))\n"
     "    return r", "too many operator calls (12 > 10)"),
    ("def solve(problem):\n    d = [custom(problem, 'x') for _ in range(2)]\n    for x in d:\n        d.append(review(problem, x))\n"
     "    return d", "unbounded loop (line 3)"),
    ("def solve(problem):\n    d = [custom(problem, 'x') for _ in range(2)]\n    return [review(problem, x) for x in d]",
     "unbounded loop (line 3)"),
    ("def solve(problem):\n    n = 3\n    for _ in range(n):\n        custom(problem, 'x')", "unbounded loop (line 3)"),
    ("def solve(problem):\n    while True:\n        return custom(problem, 'x')", "while loop not allowed (line 2)"),
    ("def solve(problem):\n    return eval(custom(problem, 'x'))", "call to eval not allowed (line 2)"),
    ("def solve(problem):\n    d = [custom(problem, 'x')]\n    return max(d, key=review)", "operator review must be called directly (line 3)"),
    ("def solve(problem):\n    return '{0}'.format(custom(problem, 'x'))", "str.format not allowed (line 2)"),
    ("def solve(problem):\n    f = lambda p: custom(p, 'x')\n    return f(problem)", "nested function or class not allowed (line 2)"),
    ("x = 1\ndef solve(problem):\n    return custom(problem, 'x')", "top-level code not allowed (line 1)"),
    ("def solve(problem):\n    return custom(problem, 'x')\nprint(solve('q'))", "top-level code not allowed (line 3)"),
    ("def solve(problem, hint):\n    return custom(problem, hint)", "solve must take exactly one argument (line 1)"),
    ("def answer(problem):\n    return custom(problem, 'x')", "no def solve(problem)"),
    ("def solve(problem)\n    return 1", "syntax error (line 1)"),
    ("def solve(problem):\n    return code_generate(problem, 'f', 'x')", "call to code_generate not allowed (line 2)"),
    # seen at run time after paid executor calls: a name never bound, an operator's wrong arity
    ("def solve(problem):\n    drafts = [programmer(problem)]\n    return format(problem, solution)",
     "undefined name solution (line 3)"),
    ("def solve(problem):\n    d = [custom(problem, 'x')]\n    return ensemble(problem, solutions[0])",
     "undefined name solutions (line 3)"),
    ("def solve(problem):\n    a = custom(problem, 'x')\n    return empl[0] + answers[1]", "undefined name empl (line 3)"),
    ("def solve(problem):\n    return custom(problem, 'text', 0)", "custom takes 2 arguments, got 3 (line 2)"),
    ("def solve(problem):\n    return review(problem)", "review takes 2 arguments, got 1 (line 2)"),
    ("def solve(problem):\n    return programmer(problem, 'a', 'b')", "programmer takes 1 to 2 arguments, got 3 (line 2)"),
    ("def solve(problem):\n    return revise(problem, feedback='x')", "revise takes 3 arguments, got 2 (line 2)"),
    ("def solve(problem):\n    return programmer(problem, hint='x')", "programmer has no argument hint (line 2)"),
    ("def solve(problem):\n    return custom(problem, input='x')", "custom got argument input twice (line 2)"),
])
def test_rejections_name_the_reason(code, reason):
    assert ok(code) == (False, reason)


def test_literal_rule_details():
    # single digits and literals absent from the problem are fine; the rule needs the problem
    good = "def solve(problem):\n    return ensemble(problem, [custom(problem, 'Think step by step.') for _ in range(3)])"
    assert ok(good) == (True, "ok")
    assert ok("def solve(problem):\n    return custom(problem, 'x') + str(230)") == (True, "ok")
    copied = "def solve(problem):\n    return custom(problem, 'x') + str(23)"
    assert workflow.check_workflow(copied, None, MATH) == (True, "ok")
    assert ok("def solve(problem):\n    return custom(problem, str(1000))", "What is 1,000 + 5?")[1].startswith("literal 1000")
    assert ok("def solve(problem):\n    return custom(problem, str(19.0))")[1].startswith("literal 19.0")
    assert ok('"""A docstring."""\ndef solve(problem):\n    return custom(problem, "x")') == (True, "ok")


def test_names_and_arity_accept_valid_code():
    good = [
        "def solve(problem):\n    drafts = []\n    for i in range(3):\n        drafts.append(custom(problem, str(i)))\n"
        "    return ensemble(problem, drafts)",
        "def solve(problem):\n    return ensemble(problem, [custom(problem, str(i)) for i in range(2) if i >= 0])",
        "def solve(problem):\n    return format(problem, programmer(problem, analysis='Use integers.'))",
        "def solve(problem):\n    return programmer(problem=problem)",
        "def solve(problem):\n    a = answer_generate(problem)\n    if len(a) > 3:\n        best = review(problem, a)\n"
        "    else:\n        best = a\n    return revise(problem, a, feedback=best)",
        "def solve(problem):\n    try:\n        a = custom(problem, 'x')\n    except OperatorError as e:\n        a = str(e)\n"
        "    except Exception:\n        a = ''\n    return a",
        "def solve(problem):\n    n = 0\n    n += 1\n    if (a := custom(problem, 'x')):\n        return a\n    return None",
        "def solve(problem):\n    d = [custom(problem, 'x')]\n    return custom(*d)",  # *args: arity not checked
    ]
    for code in good:
        assert ok(code) == (True, "ok"), code
    code = workflow.FEWSHOT["code"][-1][1]  # code_generate's instruction has a default
    assert workflow.check_workflow(code.replace(', "Write the function.")', ")"), None, operators.OPERATOR_SETS["code"]) == (True, "ok")
    # the arity comes from the operator functions themselves
    assert workflow.op_params("programmer") == [("problem", True), ("analysis", False)]


def _run_count(code):
    """Naive reference: execute the workflow with stub operators and count the calls."""
    n = [0]

    def stub(*a, **k):
        n[0] += 1
        return "s"
    ns = {op: stub for op in operators.OPERATORS}
    exec(code, ns)
    ns["solve"]("problem text")
    return n[0]


COUNTED = [
    "def solve(problem):\n    return programmer(problem)",
    "def solve(problem):\n    d = [custom(problem, 'x') for _ in range(3)]\n    d.append(programmer(problem))\n    return ensemble(problem, d)",
    "def solve(problem):\n    d = []\n    for i in range(2):\n        for j in range(1, 4):\n            d.append(custom(problem, str(j)))\n    return ensemble(problem, d)",
    "def solve(problem):\n    d = [review(problem, custom(problem, 'x')) for i in range(2) for j in range(2)]\n    return d[0]",
    "def solve(problem):\n    d = [custom(problem, 'x') for i in range(0, 10, 4) if len(answer_generate(problem)) > 0]\n    return d[-1]",
    "def solve(problem):\n    a = answer_generate(problem)\n    for _ in range(2):\n        a = revise(problem, a, review(problem, a))\n    return format(problem, a)",
    "def solve(problem):\n    s = ''\n    for w in problem.split():\n        s += w\n    return custom(s, 'x')",
]


@pytest.mark.parametrize("code", COUNTED)
def test_static_count_matches_execution(code):
    n = _run_count(code)
    assert ok(code, max_calls=n) == (True, "ok")
    assert ok(code, max_calls=n - 1) == (False, f"too many operator calls ({n} > {n - 1})")


def test_if_counts_the_larger_branch():
    code = ("def solve(problem):\n    a = custom(problem, 'x')\n    if len(a) > 3:\n"
            "        a = ensemble(problem, [custom(problem, 'y') for _ in range(4)])\n    else:\n"
            "        a = review(problem, a)\n    return format(problem, a)")
    assert ok(code, max_calls=7) == (True, "ok")
    assert ok(code, max_calls=6) == (False, "too many operator calls (7 > 6)")
    # an upper bound: statements after a `return` inside a branch still count
    early = code.replace("a = ensemble", "return ensemble")
    assert ok(early, max_calls=6)[0] is False


def test_extract_code():
    assert scorers.extract_code("hi\n```python\ndef solve(problem):\n    return 1\n```\nbye") == "def solve(problem):\n    return 1\n"
    assert scorers.extract_code("```\nx = 1\n```") == "x = 1\n"
    assert scorers.extract_code("```Python\nx = 1") == "x = 1"  # generation stopped before the closing fence
    assert scorers.extract_code("```text\nnot it\n```\n```python\nx = 2\n```") == "x = 2\n"  # a python block wins
    assert scorers.extract_code("```python\na\n```\n```python\nb\n```") == "a\n"
    assert scorers.extract_code("no fence here") is None


def test_build_prompt_structure_and_catalogue():
    msgs = workflow.build_prompt("What is 47 * 6?", "math")
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * len(workflow.FEWSHOT["math"]) + ["user"]
    last = msgs[-1]["content"]
    assert last.startswith("Operators:\n") and "Problem: What is 47 * 6?\n" in last
    assert all(operators.OPERATORS[o].signature in last for o in MATH) and "code_generate" not in last
    assert "at most 6 operator calls" in msgs[0]["content"]
    assert all(m["content"].startswith("```python\n") for m in msgs if m["role"] == "assistant")
    qa = workflow.build_prompt("Question: who?", "qa")[-1]["content"]
    assert "answer_generate(" in qa and "programmer(" not in qa
    code = workflow.build_prompt("def f(x):\n    pass", "code", offered=["code_generate", "test"])[-1]["content"]
    assert "code_generate(" in code and "custom(" not in code
    with pytest.raises(ValueError, match="unknown family"):
        workflow.build_prompt("x", "vision")
