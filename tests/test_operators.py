"""Operator logic (not model quality) against a loopback server with canned replies."""
import pytest

from openai_stub import StubServer
import executor
import operators
import workflow


def ctx_for(srv, max_calls=20, **context):
    ex = executor.Executor(srv.url, "stub", base_delay=0.01, max_delay=0.02)
    return operators.OpContext(ex, context, max_calls=max_calls)


def last_user(messages):
    return messages[-1]["content"]


def test_programmer_runs_code_and_retries_with_the_error():
    def reply(m):
        if len(m) == 1:
            return "Sure!\n```python\nx = 47 * 6\nprint(x / 0)\n```"
        assert "ZeroDivisionError" in last_user(m) and m[1]["role"] == "assistant"
        return "```python\nprint(47 * 6)\n```"
    with StubServer(reply) as srv:
        ctx = ctx_for(srv)
        assert operators.op_programmer(ctx, "What is 47 * 6?") == "282"
    assert ctx.calls == 2 and len(srv.requests) == 2


def test_programmer_whole_reply_as_code_and_gives_up():
    with StubServer(lambda m: "print(6 * 7)") as srv:  # no fence: the reply is the program
        assert operators.op_programmer(ctx_for(srv), "6 * 7?") == "42"
    with StubServer(lambda m: "I cannot write code.") as srv:
        ctx = ctx_for(srv)
        assert operators.op_programmer(ctx, "6 * 7?") == ""
    assert ctx.calls == 3  # the first try and 2 repairs


def test_programmer_silent_program_is_an_error():
    with StubServer(lambda m: "```python\nx = 1\n```" if len(m) == 1 else "```python\nprint('ok')\n```") as srv:
        ctx = ctx_for(srv)
        assert operators.op_programmer(ctx, "p") == "ok"
        assert "printed nothing" in last_user(srv.requests[1]["messages"])


SOLS = ["So 2 + 3 = 5. Answer: 5", "Answer: 7", "3 + 4 = 7, the answer is 7."]


def test_ensemble_uses_a_usable_choice():
    with StubServer(lambda m: "(A)") as srv:
        assert operators.op_ensemble(ctx_for(srv), "p", SOLS) == SOLS[0]
    with StubServer(lambda m: "Solution C is best") as srv:
        assert operators.op_ensemble(ctx_for(srv), "p", SOLS) == SOLS[2]


@pytest.mark.parametrize("choice", ["I think they are all fine", "(Z)", "", "D"])
def test_ensemble_falls_back_to_majority_vote(choice):
    with StubServer(lambda m: choice) as srv:
        ctx = ctx_for(srv)
        assert operators.op_ensemble(ctx, "p", SOLS) == SOLS[1]
    assert ctx.calls == 1


def test_ensemble_agreement_and_edge_cases_cost_nothing():
    with StubServer() as srv:
        ctx = ctx_for(srv)
        assert operators.op_ensemble(ctx, "p", ["Answer: 1,000", "so 1000.", "It is 1000.0"]) == "Answer: 1,000"
        assert operators.op_ensemble(ctx, "p", []) == ""
        assert operators.op_ensemble(ctx, "p", "just one") == "just one"
    assert ctx.calls == 0 and srv.requests == []


BUGGY = "def add(a, b):\n    return a - b\n"
FIXED = "def add(a, b):\n    return a + b\n"
TESTS = ["assert candidate(1, 2) == 3", "assert candidate(0, 0) == 0", "assert candidate(2, -2) == 0"]


def test_test_operator_runs_public_tests_and_repairs():
    def reply(m):
        assert "candidate(1, 2) == 3" in last_user(m) and "candidate(0, 0)" not in last_user(m)
        return f"```python\n{FIXED}```"
    with StubServer(reply) as srv:
        ctx = ctx_for(srv, public_tests=TESTS)
        assert operators.op_test(ctx, "add two numbers", f"```python\n{BUGGY}```", "add") == FIXED
    assert ctx.calls == 1


def test_test_operator_bounded_rounds_and_keeps_the_best():
    with StubServer(lambda m: "```python\ndef add(a, b):\n    raise SystemExit(1)\n```") as srv:
        ctx = ctx_for(srv, public_tests=TESTS)
        assert operators.op_test(ctx, "add", BUGGY, "add") == BUGGY  # passes 1 of 3; the repairs pass 0
    assert ctx.calls == 3
    with StubServer() as srv:
        ctx = ctx_for(srv)  # no public tests: nothing to run, nothing to ask
        assert operators.op_test(ctx, "add", BUGGY, "add") == BUGGY and ctx.calls == 0


def test_run_public_tests_reports_each_failure_and_hangs():
    assert operators.run_public_tests(FIXED, "add", TESTS) == []
    fails = operators.run_public_tests(BUGGY, "add", TESTS)
    assert len(fails) == 2 and "candidate(1, 2) == 3" in fails[0] and "AssertionError" in fails[0]
    fails = operators.run_public_tests("def add(a, b):\n    while True: pass\n", "add", TESTS, timeout=1)
    assert len(fails) == 3 and all("timeout" in f for f in fails)
    fake = "def add(a, b):\n    print('ok')\n    return 0\n"  # printing 'ok' does not fake a pass
    assert len(operators.run_public_tests(fake, "add", TESTS)) == 1
    with pytest.raises(ValueError):
        operators.run_public_tests(FIXED, "add; import os", TESTS)


def test_budget_exceeded_inside_an_operator_is_an_error():
    wf = "def solve(p):\n    return programmer(p)\n"
    with StubServer(lambda m: "```python\nprint(1/0)\n```") as srv:
        ex = executor.Executor(srv.url, "stub", base_delay=0.01)
        r = operators.run_workflow(wf, "q", executor=ex, max_calls=2, timeout=10)
    assert r["error"].startswith("budget: more than 2 executor calls") and r["answer"] is None
    assert r["calls"] == 2 and len(srv.requests) == 2


def test_design_example_workflow_through_the_sandbox():
    wf = ("def solve(problem):\n"
          "    drafts = [custom(problem, 'Think step by step, then state the final answer.') for _ in range(3)]\n"
          "    code_answer = programmer(problem)\n"
          "    return format(problem, ensemble(problem, drafts + [code_answer]))\n")

    def reply(m):
        u = last_user(m)
        if "Python program" in u:
            return "```python\nprint(47 * 6)\n```"
        if "Which solution" in u:
            return "no idea"
        if "final answer?" in u:
            return "Answer: 282."
        return "47 * 6 = 282. Answer: 282"
    with StubServer(reply) as srv:
        ex = executor.Executor(srv.url, "stub")
        r = operators.run_workflow(wf, "What is 47 * 6?", executor=ex, timeout=20, operators={
            k: operators.OPERATORS[k] for k in operators.OPERATOR_SETS["math"]})
    assert r == dict(r, answer="282", error=None, calls=5, prompt_tokens=50, completion_tokens=25)


def test_format_falls_back_to_the_solution():
    with StubServer(lambda m: "") as srv:
        assert operators.op_format(ctx_for(srv), "p", "blah blah. Answer: 12") == "12"
    with StubServer(lambda m: "The final answer is 12.\nBecause...") as srv:
        assert operators.op_format(ctx_for(srv), "p", "x") == "12"


def test_format_keeps_a_bare_number_without_a_call():
    with StubServer(lambda m: "The answer is 7.") as srv:  # would be wrong: format must not ask
        ctx = ctx_for(srv)
        assert [operators.op_format(ctx, "p", s) for s in ("42", " -1,250.5\n", "$3")] == ["42", "-1,250.5", "$3"]
        assert srv.requests == []
        assert operators.op_format(ctx, "p", "42 apples") == "7"  # not bare: the executor is asked


def test_operator_bad_arguments_reach_the_workflow_as_exceptions():
    wf = ("def solve(p):\n    out = []\n    for call in (lambda: custom(p), lambda: nosuch(p), lambda: test(p, 'x', 'a b')):\n"
          "        try:\n            call()\n        except NameError:\n            out.append('NameError')\n"
          "        except Exception as e:\n            out.append(str(e)[:80])\n    return ' | '.join(out)\n")
    with StubServer() as srv:
        r = operators.run_workflow(wf, "q", executor=executor.Executor(srv.url, "stub"), timeout=10,
                                 context={"public_tests": ["assert candidate() == 1"]})
    assert r["answer"].startswith("custom: op_custom() missing 1 required") and "NameError" in r["answer"]
    assert "entry_point must be a Python name" in r["answer"] and srv.requests == []


@pytest.mark.parametrize("text,want", [
    ("The answer is 42.", "42"), ("Answer: 1,234", "1,234"), ("so x = \\boxed{3/4} done", "3/4"),
    ("We get 3 apples and 5 pears so 8", "8"), ("answer: Paris.", "Paris"), ("no digits\nlast line", "last line"),
    ("", ""), ("First 1 then Answer: -7.5\nok", "-7.5"),
])
def test_extract_answer(text, want):
    assert operators.extract_answer(text) == want


def test_normalize_and_majority():
    assert operators.normalize_answer(" $1,000.0. ") == operators.normalize_answer("1000") == "1000"
    assert operators.normalize_answer("Paris") == "paris" and operators.normalize_answer("0.50") == "0.5"
    assert operators.majority_vote(["a: 1", "b: 2", "c: 2", "d: 1"]) == "a: 1"  # tie: the first
    assert set(operators.OPERATOR_SETS["code"]) <= set(operators.OPERATORS) and "programmer" not in operators.OPERATOR_SETS["qa"]


def test_operator_invocations_are_bounded_even_without_executor_calls():
    # a unanimous ensemble costs no executor call; looping on it must still hit the budget
    wf = "def solve(p):\n    for _ in range(1000):\n        ensemble(p, ['a'])\n    return 'done'\n"
    with StubServer() as srv:
        r = operators.run_workflow(wf, "q", executor=executor.Executor(srv.url, "stub"), max_calls=5, timeout=10)
    assert r["error"] == "budget: more than 5 operator calls" and r["calls"] == 0 and srv.requests == []


def test_a_new_operator_is_one_definition_and_a_family_line(monkeypatch):
    """Add verify(problem, answer) as ARCHITECTURE §3 "Adding an operator" says: one @operator function
    in operators.py and its name on a family's OPERATOR_SETS line. The generator's prompt lists it,
    the checker takes a workflow calling it (and checks its arity), and the workflow runs in the
    sandbox with the call served in the parent, as rollout.py runs one; nothing else changes."""
    def op_verify(ctx, problem, answer):
        return ctx.chat(f"Problem: {problem}\n\nAnswer: {answer}\n\nIs the answer right? Reply yes or no.",
                        max_tokens=4)

    with pytest.raises(ValueError, match="does not name the parameters"):  # the prompt's signature is the function's
        operators.operator("verify(problem)", "x")(op_verify)
    assert "verify" not in operators.OPERATORS
    wf = "def solve(problem):\n    a = answer_generate(problem)\n    return a + ' ' + verify(problem, a)\n"
    P = "What is 47 * 6?"
    try:
        operators.operator("verify(problem, answer)", "asks whether the answer is right; returns yes or no")(op_verify)
        monkeypatch.setitem(operators.OPERATOR_SETS, "math", operators.OPERATOR_SETS["math"] + ["verify"])
        prompt = workflow.build_prompt(P, "math")[-1]["content"]
        assert "- verify(problem, answer): asks whether the answer is right" in prompt
        assert workflow.check_workflow(wf, P, operators.OPERATOR_SETS["math"], 6) == (True, "ok")
        assert workflow.check_workflow(wf) == (True, "ok")  # every registered operator by default
        assert workflow.check_workflow(wf.replace("(problem, a)", "(problem)"), P, operators.OPERATOR_SETS["math"], 6) \
            == (False, "verify takes 2 arguments, got 1 (line 3)")

        def reply(m):
            return "yes" if "Is the answer right?" in m[-1]["content"] else "282"
        with StubServer(reply) as srv:
            r = operators.run_workflow(wf, P, executor=executor.Executor(srv.url, "stub"), timeout=20, operators={
                k: operators.OPERATORS[k] for k in operators.OPERATOR_SETS["math"]})
        assert r == dict(r, answer="282 yes", error=None, calls=2)
        assert "Answer: 282" in srv.requests[1]["messages"][0]["content"]
    finally:
        del operators.OPERATORS["verify"]  # unregistered: the library is as before
    assert workflow.check_workflow(wf) == (False, "call to verify not allowed (line 3)")
