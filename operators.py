"""The operators that workflows call, and the broker that serves them to a sandboxed workflow (ARCHITECTURE §3, §4).

    python operators.py wf.py --problem "What is 47 * 6?" --executor local       # one workflow, embedded executor
    python operators.py wf.py --problem "2+2?" --executor http://127.0.0.1:8000/v1 --model NAME
    python operators.py wf.py --problem "2+2?" --executor none                   # operators raise: no executor

Each operator runs here in the parent as fn(ctx, *args) -> str; the workflow's sandbox holds only
stubs that forward the call (run_workflow below passes sandbox.run_workflow the handler). Prompts
are short and concrete: the default executor is a 135M model that follows one plain instruction,
rarely two.
"""
import argparse
import functools
import inspect
import json
import re
import secrets
import sys

import executor
import sandbox
import scorers

PROGRAM_TIMEOUT = 5.0  # seconds for one executor-written program or one public-test run
RESULT_KEYS = ("answer", "error", "calls", "prompt_tokens", "completion_tokens", "cost_usd", "seconds", "infra_error")


class OpContext:
    """What operators see: the executor, this run's call budget and counters, and the
    per-problem data (context["public_tests"], ...). One per workflow run."""

    REPEAT_TEMPERATURE = 0.7

    def __init__(self, executor, context=None, max_calls=20):
        self.executor, self.context = executor, dict(context or {})
        self.max_calls = max_calls
        self.calls = self.prompt_tokens = self.completion_tokens = 0
        self.ops = 0  # operator invocations, counted by the sandbox broker
        self.cost_usd = 0.0
        self.budget_error = None
        self.infra_error = None  # set by the sandbox broker: the endpoint failed, not the workflow
        self.temperature = float(self.context.get("temperature", 0.0))
        self.sample_index = int(self.context.get("sample_index", 0))
        self._seen = {}

    def chat(self, prompt, max_tokens=512):
        """One executor call on a user prompt (or a message list), within the budget. Asking the
        same thing twice in one run samples (temperature >= 0.7, a new cache slot): otherwise
        `[custom(p, i) for _ in range(3)]` would be three copies of one greedy answer."""
        if self.calls >= self.max_calls:
            raise executor.BudgetError(f"more than {self.max_calls} executor calls")
        self.calls += 1
        if "max_tokens" in self.context:  # a per-run cap, e.g. to keep a tiny CPU executor fast
            max_tokens = min(max_tokens, int(self.context["max_tokens"]))
        if self.executor is None:
            raise executor.ExecutorError("no executor (--executor none)")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        k = json.dumps(messages)
        n = self._seen[k] = self._seen.get(k, -1) + 1
        temp = self.temperature if n == 0 else max(self.temperature, self.REPEAT_TEMPERATURE)
        text, usage = self.executor.chat(messages, temperature=temp, max_tokens=max_tokens,
                                         sample_index=self.sample_index * 1000 + n)
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cost_usd += usage["cost_usd"]
        return text


# ---- the operator library ----
# Each operator runs here in the parent as fn(ctx, *args) -> str; the workflow's sandbox holds only
# stubs that forward the call (sandbox.py). Prompts are short and concrete: the default executor is
# a 135M model that follows one plain instruction, rarely two. An operator is one definition: its
# function under @operator(signature, what it does), plus its name in OPERATOR_SETS for the families
# that offer it (ARCHITECTURE §3 "Adding an operator").

OPERATORS = {}  # name -> fn(ctx, *args) -> str, in definition order; fn.signature and fn.does for the prompt


def operator(signature, does):
    """Register the decorated fn(ctx, ...) in OPERATORS under the name `signature` starts with. The
    generator's prompt shows `signature` and `does` (workflow.catalogue); the checker takes the arity
    from fn's own parameters (workflow.op_params), so `signature` must name the same ones, in order
    (a default may go unshown: code_generate's instruction)."""
    name, shown = signature.split("(")[0], signature[signature.index("(") + 1:signature.rindex(")")]

    def register(fn):
        params = list(inspect.signature(fn).parameters)[1:]
        if [p.split("=")[0].strip() for p in shown.split(",") if p.strip()] != params:
            raise ValueError(f"operator {signature!r} does not name the parameters of {fn.__name__}{params}")
        fn.signature, fn.does = signature, does
        OPERATORS[name] = fn
        return fn
    return register


def _as_text(x):
    """An operator argument as the text its prompt holds (a workflow may pass a number or a list)."""
    return x if isinstance(x, str) else str(x)


def _code_of(reply):
    return scorers.extract_code(reply) or reply


def extract_answer(text):
    """The final answer inside a free-text solution: the last \\boxed{..}, else what follows the last
    "Answer:", else the last number, else the last non-empty line."""
    text = _as_text(text).strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1].strip()
    # ":" or "=" required, unlike scorers.ANSWER_MARK: a free-text solution also says "answer" in
    # prose ("to answer this, ..."), and "the answer is 42" is found by the last-number rule below
    tagged = re.findall(r"answer(?:\s+is)?\s*[:=]\s*([^\n]+)", text, flags=re.I)
    if tagged and tagged[-1].strip(" .*$"):
        return tagged[-1].strip(" .*$")
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if nums:
        return nums[-1]
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def normalize_answer(a):
    """For voting: case, spaces, $ and trailing dots ignored; "1,000.0" == "1000"."""
    a = re.sub(r"\s+", " ", _as_text(a)).strip().strip("$").rstrip(".").strip().lower()
    num = a.replace(",", "")
    try:
        f = float(num)
        return str(int(f)) if f.is_integer() else repr(f)
    except (ValueError, OverflowError):
        return a


def majority_vote(solutions):
    """The first solution whose extracted answer is the most common one."""
    keys = [normalize_answer(extract_answer(s)) for s in solutions]
    counts = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    best = max(counts.values())
    return solutions[next(i for i, k in enumerate(keys) if counts[k] == best)]


@operator("custom(input, instruction)", "follows the instruction on the input; returns the reply")
def op_custom(ctx, input, instruction):
    return ctx.chat(f"{_as_text(instruction)}\n\n{_as_text(input)}")


@operator("answer_generate(input)", "thinks step by step; returns the final answer")
def op_answer_generate(ctx, input):
    return ctx.chat(f"{_as_text(input)}\n\nThink step by step. End with a line 'Answer: <final answer>'.")


@operator("programmer(problem, analysis='')", "writes and runs a Python program; returns the answer it prints")
def op_programmer(ctx, problem, analysis=""):
    """The executor writes a program that prints the answer; it runs in a fresh sandbox; on an
    error (or no output) the executor sees the error and tries again, twice at most. Returns the
    program's output, or "" when every attempt failed."""
    prompt = f"Write one short Python program that prints the answer.\n\nProblem: {_as_text(problem)}\n"
    if analysis:
        prompt += f"Hint: {_as_text(analysis)}\n"
    messages = [{"role": "user", "content": prompt + "\nReply with only the code in a ```python block."}]
    for attempt in range(3):
        reply = ctx.chat(messages, max_tokens=400)
        r = sandbox.run_program(_code_of(reply), timeout=PROGRAM_TIMEOUT, mem_mb=256)
        out = r["stdout"].strip()
        if r["ok"] and out:
            return out
        err = (r["stderr"].strip()[-400:] or r["error"]) if not r["ok"] else "it printed nothing"
        messages = messages + [{"role": "assistant", "content": reply},
                               {"role": "user", "content": f"The program failed:\n{err}\n\nFix it. Reply with only "
                                                           "the corrected code in a ```python block."}]
    return ""


@operator("ensemble(problem, solutions)", "picks the most consistent answer from a list of solutions")
def op_ensemble(ctx, problem, solutions):
    """Self-consistency: the executor names the solution that agrees most with the others; when its
    reply names none (or all answers already agree) the majority vote of the answers decides."""
    sols = [_as_text(s).strip() for s in ([solutions] if isinstance(solutions, str) else list(solutions))]
    sols = [s for s in sols if s][:26]
    if not sols:
        return ""
    if len({normalize_answer(extract_answer(s)) for s in sols}) == 1:
        return sols[0]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(sols)]
    listing = "\n\n".join(f"({l}) {s}" for l, s in zip(letters, sols))
    reply = ctx.chat(f"Problem: {_as_text(problem)}\n\nSolutions:\n\n{listing}\n\n"
                     "Which solution agrees most with the others? Reply with one letter.", max_tokens=8).strip()
    m = (re.fullmatch(r"\W*([A-Z])\W*", reply) or re.search(r"\(([A-Z])\)", reply)
         or re.search(r"(?:solution|answer|option)\s*\(?([A-Z])\b", reply, flags=re.I))
    if m and m.group(1).upper() in letters:
        return sols[letters.index(m.group(1).upper())]
    return majority_vote(sols)


@operator("review(problem, solution)", "returns a critique of the solution")
def op_review(ctx, problem, solution):
    return ctx.chat(f"Problem: {_as_text(problem)}\n\nSolution: {_as_text(solution)}\n\nIs this solution correct? If it is, "
                    "reply 'correct'. If not, name the first mistake in one sentence.", max_tokens=200)


@operator("revise(problem, solution, feedback)", "returns the solution repaired using the feedback")
def op_revise(ctx, problem, solution, feedback):
    return ctx.chat(f"Problem: {_as_text(problem)}\n\nSolution: {_as_text(solution)}\n\nFeedback: {_as_text(feedback)}\n\n"
                    "Write a corrected solution. End with a line 'Answer: <final answer>'.")


_BARE_NUMBER = re.compile(r"-?\$?\d[\d,]*(\.\d+)?")


@operator("format(problem, solution)", "returns only the final answer of the solution")
def op_format(ctx, problem, solution):
    """Only the final answer. An empty or chatty reply falls back to the answer in the solution.
    A solution that already is a bare number (programmer's output) comes back as it is, without a
    call: the 135M executor asked for "the final answer" of "42" often answered something else, and
    `programmer -> format` scored far below programmer alone."""
    bare = _as_text(solution).strip()
    if _BARE_NUMBER.fullmatch(bare):
        return bare
    reply = ctx.chat(f"Problem: {_as_text(problem)}\n\nSolution: {_as_text(solution)}\n\n"
                     "What is the final answer? Reply with the answer only.", max_tokens=32).strip()
    line = re.sub(r"^(?:the\s+)?" + scorers.ANSWER_MARK, "", reply.splitlines()[0] if reply else "",
                  flags=re.I).strip().rstrip(".")
    return line if line else extract_answer(solution)


@operator("code_generate(problem, entry_point, instruction)", "returns Python code defining entry_point")
def op_code_generate(ctx, problem, entry_point, instruction=""):
    reply = ctx.chat(f"{_as_text(instruction)}\nWrite the Python function `{_as_text(entry_point)}` for this task. "
                     f"Reply with only the code in a ```python block.\n\n{_as_text(problem)}".lstrip(), max_tokens=600)
    return _code_of(reply)


def run_public_tests(code, entry_point, tests, timeout=PROGRAM_TIMEOUT):
    """Run each `assert ...candidate(...)` string against `code` in one sandbox. Returns the list
    of failures ("test -> error"), one per failing test; a crash fails them all."""
    if not str(entry_point).isidentifier():
        raise ValueError(f"entry_point must be a Python name, got {entry_point!r}")
    tag = secrets.token_hex(8)  # the code under test cannot guess it to fake a pass
    harness = (f"\n\ncandidate = {entry_point}\n"
               f"for _t in {list(tests)!r}:\n"
               "    try:\n"
               "        exec(_t, globals())\n"
               f"        print({tag!r}, 'ok', flush=True)\n"
               "    except BaseException as _e:\n"
               f"        print({tag!r}, 'fail', repr(_t)[:200], '->', type(_e).__name__, str(_e)[:200], flush=True)\n")
    r = sandbox.run_program(code + harness, timeout=timeout, mem_mb=512)
    lines = [l[len(tag) + 1:] for l in r["stdout"].splitlines() if l.startswith(tag + " ")]
    fails = [l[5:] for l in lines if l.startswith("fail ")]
    if len(lines) < len(tests):  # the run died part-way: the rest did not pass
        why = r["error"] or "did not finish"
        tail = r["stderr"].strip().splitlines()[-1:] if r["stderr"].strip() else []
        fails += [f"{t[:200]!r} -> {why}" + (f" ({tail[0][:200]})" if tail else "") for t in tests[len(lines):]]
    return fails


@operator("test(problem, solution, entry_point)",
          "runs the public tests, repairs the code if they fail; returns code")
def op_test(ctx, problem, solution, entry_point):
    """Run the public tests (ctx.context["public_tests"]); on failure show the executor the failing
    tests and let it repair the code, 3 rounds at most. Returns the version passing most tests."""
    tests = [t for t in ctx.context.get("public_tests") or [] if isinstance(t, str)]
    code = _code_of(_as_text(solution))
    if not tests:
        return code
    best, best_fails = code, None
    for round_ in range(4):
        fails = run_public_tests(code, entry_point, tests)
        if best_fails is None or len(fails) < len(best_fails):
            best, best_fails = code, fails
        if not fails or round_ == 3:
            break
        reply = ctx.chat(f"Task:\n{_as_text(problem)}\n\nThis code fails some tests:\n```python\n{code}\n```\n\nFailures:\n"
                         + "\n".join(fails[:5]) + "\n\nFix the code. Reply with only the corrected code in a "
                         "```python block.", max_tokens=600)
        code = _code_of(reply)
    return best


OPERATOR_SETS = {  # ARCHITECTURE §3 "offered for"; the order is the order the prompt lists them in
    "math": ["custom", "answer_generate", "programmer", "ensemble", "review", "revise", "format"],
    "qa": ["custom", "answer_generate", "ensemble", "review", "revise", "format"],
    "code": ["custom", "code_generate", "test", "ensemble", "review", "revise"],
}
OPERATOR_SETS["mixed"] = list(OPERATOR_SETS["math"])  # mixed differs from math in its prompt only (workflow.FEWSHOT)


# ---- the broker: a workflow's operator calls, served here ----

def handler(ctx, ops):
    """handler(msg) -> reply for sandbox.run_workflow: call ops[name](ctx, *args, **kwargs) within
    the run's budget. An InfraError (the endpoint's fault) voids the run: it is kept in
    ctx.infra_error and every later call is refused."""
    def handle(msg):
        name, args, kwargs = msg.get("op"), msg.get("args", []), msg.get("kwargs", {})
        fn = ops.get(name) if isinstance(name, str) else None
        if fn is None:
            return {"error": f"unknown operator {name!r}"}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return {"error": f"{name}: malformed call"}
        if ctx.infra_error:  # the run is void already: spend nothing more on it
            return {"error": f"{name}: executor unavailable"}
        # operator time is not charged to the sandbox's timeout, so operators that need no
        # executor call (a unanimous ensemble, test() on passing code) must be bounded too
        ctx.ops += 1
        if ctx.ops > ctx.max_calls:
            ctx.budget_error = ctx.budget_error or f"more than {ctx.max_calls} operator calls"
            return {"error": f"budget: more than {ctx.max_calls} operator calls"}
        try:
            out = fn(ctx, *args, **kwargs)
            return {"ok": sandbox.clip(out if isinstance(out, str) else str(out))}
        except executor.BudgetError as e:
            ctx.budget_error = ctx.budget_error or str(e)
            return {"error": f"budget: {e}"}
        except executor.InfraError as e:
            # the endpoint's fault, not the workflow's: reported beside the result whatever the
            # workflow then does with the exception (it may catch it and answer anyway)
            ctx.infra_error = ctx.infra_error or str(e)[:2000]
            return {"error": f"{name}: executor unavailable"}
        except TypeError as e:  # wrong arguments from the workflow
            return {"error": f"{name}: {e}"}
        except Exception as e:  # ExecutorError and anything else: the workflow sees an exception
            return {"error": f"{name}: {type(e).__name__}: {e}"[:2000]}
    return handle


def run_workflow(code, problem, *, executor=None, operators=None, context=None, timeout=60.0,
                 mem_mb=1024, max_calls=20):
    """Run `solve(problem)` from `code` in a fresh sandbox with the operator library (or the dict
    `operators`) behind its stubs: {RESULT_KEYS}. Never raises for anything the workflow does.
    `timeout` is the child's own wall time (operator calls do not count). `infra_error` is set (the
    first message) when an operator call met an InfraError: the result then says nothing about the
    workflow and must not be scored."""
    ops = OPERATORS if operators is None else operators
    ctx = OpContext(executor, context or {}, max_calls=max_calls)
    r = sandbox.run_workflow(code, problem, list(ops), handler(ctx, ops), timeout=timeout, mem_mb=mem_mb)
    error = "budget: " + ctx.budget_error if ctx.budget_error else r["error"]  # a caught budget error still marks the run
    return dict(answer=r["answer"], error=error, calls=ctx.calls, prompt_tokens=ctx.prompt_tokens,
                completion_tokens=ctx.completion_tokens, cost_usd=round(ctx.cost_usd, 8),
                seconds=r["seconds"], infra_error=ctx.infra_error)


def job(code, problem, **kwargs):
    """A sandbox.run_many job running one workflow: run_workflow(code, problem, **kwargs)."""
    return functools.partial(run_workflow, code, problem, **kwargs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="Python file defining solve(problem)")
    ap.add_argument("--problem", required=True, help="the problem text passed to solve()")
    ap.add_argument("--executor", default="none", help="none | local | an OpenAI-compatible base URL")
    ap.add_argument("--model", default=None, help="executor model name (URL executors)")
    ap.add_argument("--context", default=None, help="JSON object of per-problem data (e.g. public_tests)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--mem-mb", type=int, default=1024)
    ap.add_argument("--max-calls", type=int, default=20)
    args = ap.parse_args(argv)
    if args.executor not in ("none", "local") and not args.executor.startswith(("http://", "https://")):
        ap.error(f"--executor must be none, local or an http(s) URL, got {args.executor!r}")
    if args.timeout <= 0 or args.mem_mb < 64 or args.max_calls < 0:
        ap.error("--timeout must be > 0, --mem-mb >= 64, --max-calls >= 0")
    try:
        with open(args.workflow, encoding="utf-8") as f:
            code = f.read()
    except (OSError, UnicodeDecodeError) as e:
        ap.error(f"cannot read workflow file {args.workflow}: {e}")
    context = None
    if args.context:
        try:
            context = json.loads(args.context)
            assert isinstance(context, dict)
        except Exception:
            ap.error("--context must be a JSON object")
    try:  # config.cli's exit 2, written out: importing config would bring torch into this runner
        with executor.make_executor(args.executor, model=args.model) as ex:
            res = run_workflow(code, args.problem, executor=ex, context=context, timeout=args.timeout,
                               mem_mb=args.mem_mb, max_calls=args.max_calls)
    except (executor.ExecutorError, sandbox.SandboxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
