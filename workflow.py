"""What a valid workflow is: the generator's prompt, the fixed baseline workflows and the static
checker, side by side so they cannot drift apart (ARCHITECTURE §3).

    python -c "import workflow; print(workflow.check_workflow(workflow.BASELINES['math']['programmer']))"
    python -c "import workflow, json; print(json.dumps(workflow.build_prompt('What is 47 * 6?', 'math'), indent=1))"

A workflow is `def solve(problem)` that calls only the operators offered for its benchmark family
(operators.OPERATOR_SETS) and simple builtins, within a call budget, never copying numbers or text
from the problem. The generator's completion starts at PREFILLS[family], inside the code block;
extract_code (scorers.py) takes the block out again.
"""
import ast
import builtins
import inspect
import re

import operators

def catalogue(ops):
    """The operators as a prompt lists them (the generator's here, the meta-agent's in refine.py):
    one line each, the signature and what it does, as its @operators.operator registered them."""
    return "\n".join(f"- {operators.OPERATORS[o].signature}: {operators.OPERATORS[o].does}" for o in ops)


SAFE_BUILTINS = frozenset("len range str int float min max sorted enumerate zip list dict set sum abs round "
                          "any all isinstance print".split())


# Few-shot turns per family: (problem, workflow). A 135M generator copies the *last* example far
# more than it follows any instruction, so the last one is the richest (EXAMPLE_WORKFLOWS) and
# the earlier ones vary the structure. Each starts like PREFILLS[family] continues.
_CODE_NAME = 'name = problem.split("def ")[-1].split("(")[0].strip()'  # entry point: the prompt's last def


FEWSHOT = {
    "math": [
        ("Ana has 12 stickers and buys 30 more. How many stickers does Ana have now?", '''def solve(problem):
    drafts = [custom(problem, "Solve it step by step."), answer_generate(problem)]
    return ensemble(problem, drafts)
'''),
        ("What is (17 + 25) * 3?", '''def solve(problem):
    drafts = [programmer(problem)]
    return format(problem, drafts[0])
'''),
        ("What is 35 * 4?", '''def solve(problem):
    drafts = [programmer(problem), custom(problem, "Think step by step, then give the final answer.")]
    return ensemble(problem, drafts)
'''),
    ],
    # mixed: the label answer and the arithmetic answer each shown once, and last a draft of each
    # kind side by side, so iteration 0 writes both programmer- and custom-led workflows for every
    # kind and its groups have something to rank (ARCHITECTURE §5)
    "mixed": [
        ("Is a lemon sour? Answer yes or no.", '''def solve(problem):
    drafts = [custom(problem, "Reply with one word.")]
    return drafts[0]
'''),
        ("What is (17 + 25) * 3? Answer with a number.", '''def solve(problem):
    drafts = [programmer(problem)]
    return format(problem, drafts[0])
'''),
        ("Review: \"The tea was cold.\"\nIs this review positive or negative? Answer positive or negative.",
         '''def solve(problem):
    drafts = [programmer(problem), custom(problem, "Reply with one word.")]
    return ensemble(problem, drafts)
'''),
    ],
    "qa": [
        ("Passage: The bridge opened in 1932 and was widened in 1958.\nQuestion: How many years after opening was "
         "the bridge widened?", '''def solve(problem):
    drafts = [answer_generate(problem)]
    feedback = review(problem, drafts[0])
    return format(problem, revise(problem, drafts[0], feedback))
'''),
        ("Question: Which river flows through the capital of France?\n\nContext:\nParis: Paris is the capital of "
         "France.\nSeine: The Seine flows through Paris.", '''def solve(problem):
    drafts = [answer_generate(problem), custom(problem, "Answer with a short phrase from the context.")]
    return format(problem, ensemble(problem, drafts))
'''),
    ],
    "code": [
        ('def add(a, b):\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n', f'''def solve(problem):
    {_CODE_NAME}
    drafts = [code_generate(problem, name, "Write the complete function.")]
    return test(problem, drafts[0], name)
'''),
        ('def is_even(n):\n    """Return True if n is even.\n    >>> is_even(4)\n    True\n    """\n', f'''def solve(problem):
    {_CODE_NAME}
    drafts = [code_generate(problem, name, "Write the function.") for _ in range(2)]
    return test(problem, ensemble(problem, drafts), name)
'''),
    ],
}


EXAMPLE_WORKFLOWS = {fam: shots[-1][1] for fam, shots in FEWSHOT.items()}


def guide_completions(family):
    """The family's few-shot workflows as completions after PREFILLS[family], closed like a sampled
    one: --guides fewshot runs them on every training problem beside the m samples (collect.py)."""
    out = []
    for _, code in FEWSHOT[family]:
        text = f"```python\n{code}```"
        if not text.startswith(PREFILLS[family]):
            raise ValueError(f"few-shot workflow of {family!r} does not start like its prefill: {code!r}")
        out.append(text[len(PREFILLS[family]):])
    return out


class _Reject(Exception):
    pass


def op_params(name):
    """Parameters of operator `name` as the workflow calls it: [(name, required)] after `ctx`, read
    from the registered function itself so the arity check cannot drift from the library."""
    return [(p.name, p.default is p.empty)
            for p in list(inspect.signature(operators.OPERATORS[name]).parameters.values())[1:]]


# Names the workflow's run-time globals hold besides operators and SAFE_BUILTINS that valid code
# reads without calling: exception classes in `except ...:` (the sandbox gives full builtins).
_EXCEPTION_NAMES = frozenset(k for k, v in vars(builtins).items() if isinstance(v, type)
                             and issubclass(v, BaseException)) | {"OperatorError"}


def _line(node):
    return f"(line {getattr(node, 'lineno', '?')})"


def _range_len(node):
    """Iterations of `range(K)` / `range(a, b)` / `range(a, b, s)` with literal ints, else None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords and 1 <= len(node.args) <= 3):
        return None
    vals = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
    if not all(type(v) is int for v in vals):
        return None
    return len(range(*vals)) if vals[-1] != 0 or len(vals) < 3 else None


def _count_calls(node, ops):
    """Static upper bound on operator calls: literal-range loops multiply their body, an if takes
    its larger branch (statements after a return still count: a bound, not an exact count), a
    loop that calls operators without a literal bound is rejected."""
    def count(n):
        return _count_calls(n, ops)

    def total(nodes):
        return sum(count(n) for n in nodes)

    if isinstance(node, (ast.For, ast.AsyncFor)):
        body = total(node.body)
        k = _range_len(node.iter)
        if k is None and body:
            raise _Reject(f"unbounded loop {_line(node)}")
        return count(node.iter) + (k or 0) * body + total(node.orelse)
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        elts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        gens, n, mult = node.generators, 0, 1
        for i, g in enumerate(gens):  # each iter runs once per iteration of the generators before it
            n += mult * count(g.iter)
            k = _range_len(g.iter)
            inner = total(elts) + sum(total(h.ifs) for h in gens[i:]) + total(h.iter for h in gens[i + 1:])
            if k is None and inner:
                raise _Reject(f"unbounded loop {_line(node)}")
            mult *= k or 0
            n += mult * total(g.ifs)
        return n + mult * total(elts)
    if isinstance(node, (ast.If, ast.IfExp)):
        body, orelse = (node.body, node.orelse) if isinstance(node, ast.If) else ([node.body], [node.orelse])
        return count(node.test) + max(total(body), total(orelse))
    own = int(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ops)
    return own + total(ast.iter_child_nodes(node))


def _problem_literals(problem):
    text = str(problem)
    nums = set(re.findall(r"\d+(?:\.\d+)?", text)) | set(re.findall(r"\d+(?:\.\d+)?", text.replace(",", "")))
    return text, {n for n in nums if sum(c.isdigit() for c in n) >= 2}


def check_workflow(code, problem=None, allowed_ops=None, max_calls=10):
    """Static check of a generated workflow, before any execution (ARCHITECTURE §3), calling only
    `allowed_ops` (default: every registered operator, operators.OPERATORS).
    Returns (ok, reason); reason is short and names the line, e.g. "import not allowed (line 3)".
    The checks run in a fixed order and the first failure is the reason."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return False, f"syntax error (line {e.lineno})"
    except (ValueError, TypeError, MemoryError, RecursionError):  # null bytes, absurd nesting
        return False, "unparsable code"
    ops = set(operators.OPERATORS if allowed_ops is None else allowed_ops)
    try:
        fn = _the_solve(tree)
        _check_nodes(fn, ops)
        _check_names(fn, ops)
        _check_arity(fn, ops)
        calls = sum(_count_calls(s, ops) for s in fn.body)
        if calls == 0:
            raise _Reject("no operator call")
        if calls > max_calls:
            raise _Reject(f"too many operator calls ({calls} > {max_calls})")
        if problem is not None:
            _check_copied(fn, *_problem_literals(problem))
    except _Reject as e:
        return False, str(e)
    except RecursionError:
        return False, "code nested too deeply"
    return True, "ok"


def _the_solve(tree):
    """The module's one `def solve(problem)`: no import anywhere, nothing else at the top level but
    a docstring, exactly one plain argument, no decorator."""
    for n in ast.walk(tree):  # first, so a top-level import is named as such
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            raise _Reject(f"import not allowed {_line(n)}")
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # a module docstring is fine
    solves = [n for n in body if isinstance(n, ast.FunctionDef) and n.name == "solve"]
    if not solves:
        raise _Reject("no def solve(problem)")
    for n in body:
        if not (isinstance(n, ast.FunctionDef) and n.name == "solve"):
            raise _Reject(f"top-level code not allowed {_line(n)}")
    if len(solves) > 1:
        raise _Reject(f"more than one solve {_line(solves[1])}")
    fn = solves[0]
    a = fn.args
    if (len(a.args) != 1 or a.posonlyargs or a.vararg or a.kwarg or a.kwonlyargs or a.defaults):
        raise _Reject(f"solve must take exactly one argument {_line(fn)}")
    if fn.decorator_list:
        raise _Reject(f"decorator not allowed {_line(fn)}")
    return fn


def _check_nodes(fn, ops):
    """Reject, node by node inside solve, what could reach past the operators and SAFE_BUILTINS or
    past the call count: imports, while loops (their calls cannot be counted), nested code, dunders
    and private attributes, str.format, an operator passed around instead of called, any other call."""
    called = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
    for n in ast.walk(fn):
        if n is fn:
            continue
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            raise _Reject(f"import not allowed {_line(n)}")
        if isinstance(n, ast.While):
            raise _Reject(f"while loop not allowed {_line(n)}")
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            raise _Reject(f"nested function or class not allowed {_line(n)}")
        if isinstance(n, (ast.Global, ast.Nonlocal, ast.Yield, ast.YieldFrom, ast.Await)):
            raise _Reject(f"{type(n).__name__.lower()} not allowed {_line(n)}")
        if isinstance(n, ast.Name) and "__" in n.id:
            raise _Reject(f"dunder name {n.id} not allowed {_line(n)}")
        if isinstance(n, ast.Attribute) and n.attr.startswith("_"):
            raise _Reject(f"attribute {n.attr} not allowed {_line(n)}")
        if isinstance(n, ast.Attribute) and n.attr in ("format", "format_map"):
            raise _Reject(f"str.{n.attr} not allowed {_line(n)}")  # "{0.__class__}".format(x)
        if isinstance(n, ast.Name) and n.id in ops and isinstance(n.ctx, ast.Load) and id(n) not in called:
            raise _Reject(f"operator {n.id} must be called directly {_line(n)}")  # sorted(key=review)
        if isinstance(n, ast.Call):
            if isinstance(n.func, ast.Name):
                if n.func.id not in ops and n.func.id not in SAFE_BUILTINS:
                    raise _Reject(f"call to {n.func.id} not allowed {_line(n)}")
            elif not isinstance(n.func, ast.Attribute):
                raise _Reject(f"indirect call not allowed {_line(n)}")


def _check_names(fn, ops):
    """Every name read in solve must exist at run time (a NameError there comes only after slow
    operator calls). Conservative: a name bound anywhere in solve counts as defined everywhere,
    whatever the order or branch, so valid code is never rejected."""
    defined = {fn.args.args[0].arg} | set(ops) | SAFE_BUILTINS | _EXCEPTION_NAMES
    for n in ast.walk(fn):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            defined.add(n.id)  # assignment, augmented, for, comprehension, with-as, walrus, del
        elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and n.name:
            defined.add(n.name)  # bound by a plain string, not a Name node
        elif isinstance(n, ast.MatchMapping) and n.rest:
            defined.add(n.rest)
    bad = [n for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in defined]
    if bad:
        bad = min(bad, key=lambda n: (n.lineno, n.col_offset))  # name the first one in the source
        raise _Reject(f"undefined name {bad.id} {_line(bad)}")


def _check_arity(fn, ops):
    """Operator calls must match the operator's signature (else an OperatorError at run time,
    possibly after other calls were paid for). Calls with *args or **kwargs are not checked."""
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in ops and n.func.id in operators.OPERATORS]
    for n in sorted(calls, key=lambda n: (n.lineno, n.col_offset)):
        if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
            continue
        name, params = n.func.id, op_params(n.func.id)
        names = [p for p, _ in params]
        positional = names[:len(n.args)]
        for k in n.keywords:
            if k.arg not in names:
                raise _Reject(f"{name} has no argument {k.arg} {_line(n)}")
            if k.arg in positional:
                raise _Reject(f"{name} got argument {k.arg} twice {_line(n)}")
        given = set(positional) | {k.arg for k in n.keywords}
        lo, hi = sum(req for _, req in params), len(params)
        if len(n.args) > hi or any(req and p not in given for p, req in params):
            takes = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise _Reject(f"{name} takes {takes} arguments, got {len(n.args) + len(n.keywords)} {_line(n)}")


def _check_copied(fn, text, numbers):
    """No literal copied from the problem: numbers of 2+ digits (alone or inside a string) and
    strings of 8+ characters that occur in the problem text. The workflow must be structure,
    not the answer."""
    for n in ast.walk(fn):
        if not isinstance(n, ast.Constant):
            continue
        v = n.value
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            s = repr(abs(v))
            if s in numbers or s.removesuffix(".0") in numbers:
                raise _Reject(f"literal {s} copied from the problem {_line(n)}")
        elif isinstance(v, str):
            if len(v.strip()) >= 8 and v.strip() in text:
                raise _Reject(f"string {v.strip()[:20]!r} copied from the problem {_line(n)}")
            for num in re.findall(r"\d+(?:\.\d+)?", v):
                if num in numbers:
                    raise _Reject(f"literal {num} copied from the problem {_line(n)}")


# The completion starts inside the code block, at the first statement: `drafts = [` makes the
# tiny generator begin with operator calls instead of doing the arithmetic itself (measured on
# arith with SmolLM2-135M, T=0.8, top-p 0.95: ~5-25 % of workflows pass the checker with the
# prefill "```python\ndef solve(problem):", ~35-50 % with this one). It fixes only how the body
# starts; what goes in the list and what follows is the generator's choice.
PREFILLS = {
    "math": "```python\ndef solve(problem):\n    drafts = [",
    "mixed": "```python\ndef solve(problem):\n    drafts = [",
    "qa": "```python\ndef solve(problem):\n    drafts = [",
    "code": f"```python\ndef solve(problem):\n    {_CODE_NAME}\n    drafts = [",
}


SYSTEM_PROMPT = ("You write workflows. A workflow is a Python function solve(problem) that never solves the problem "
                 "itself: it passes `problem` to operators, which ask a language model and return strings.")


_REMIND = {"math": "it must not do the arithmetic itself", "mixed": "it must not solve the problem itself",
           "qa": "it must not answer the question itself",
           "code": "it must not write the function itself"}


def build_prompt(problem, family, offered=None, max_calls=6):
    """Chat messages asking the generator for one workflow for `problem` (ARCHITECTURE §3): the role and
    the rules (system), few-shot turns, then the problem. Each user turn repeats the operator
    catalogue, then its problem. The completion is one ```python block; sample it after
    PREFILLS[family]. For a chat template without a system role (Gemma, older Mistral) the sampler
    folds the system text into the first user turn (sampling.chat_messages)."""
    if family not in operators.OPERATOR_SETS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(operators.OPERATOR_SETS)}")
    ops = catalogue(offered or operators.OPERATOR_SETS[family])
    rules = (f"Rules: define only solve(problem); call only the operators and simple builtins (len, str, int, "
             f"range, ...); no import, no eval; at most {max_calls} operator calls; loops only over range(N); "
             f"never copy numbers or text from the problem.")

    def turn(p):
        # the catalogue before the problem: it is then part of the prefix every prompt shares, so
        # sampling prefills only the problem (held-out sampling 1.5x faster)
        return f"Operators:\n{ops}\n\nProblem: {p}\n\nWrite solve(problem). It must call the operators; {_REMIND[family]}."

    msgs = [{"role": "system", "content": f"{SYSTEM_PROMPT}\n{rules}"}]
    for p, code in FEWSHOT[family]:
        msgs += [{"role": "user", "content": turn(p)}, {"role": "assistant", "content": f"```python\n{code}```"}]
    return msgs + [{"role": "user", "content": turn(problem)}]


# Fixed hand-written workflows: the baseline rows every trained generator is compared with.
BASELINES = {
    "math": {
        "io": 'def solve(problem):\n    return custom(problem, "Give only the final answer.")\n',
        "cot": 'def solve(problem):\n    return answer_generate(problem)\n',
        "cot_sc": ('def solve(problem):\n    drafts = [answer_generate(problem) for _ in range(3)]\n'
                   '    return ensemble(problem, drafts)\n'),
        "programmer": 'def solve(problem):\n    return programmer(problem)\n',
        # programmer's output reduced to a final answer: = programmer where it prints a bare number
        # (format returns that as it is); where it prints the question back (mixed's label kinds),
        # format answers from the problem it is also given, like io. SPOGW's iteration 3 on mixed
        # converged to it, so it belongs among the fixed workflows it is compared with.
        "programmer_format": 'def solve(problem):\n    return format(problem, programmer(problem))\n',
        "self_refine": ('def solve(problem):\n    draft = answer_generate(problem)\n'
                        '    feedback = review(problem, draft)\n    return revise(problem, draft, feedback)\n'),
    },
    "qa": {  # no programmer operator for QA (ARCHITECTURE §3), so no programmer baseline
        "io": 'def solve(problem):\n    return custom(problem, "Answer with a short phrase only.")\n',
        "cot": 'def solve(problem):\n    return format(problem, answer_generate(problem))\n',
        "cot_sc": ('def solve(problem):\n    drafts = [answer_generate(problem) for _ in range(3)]\n'
                   '    return format(problem, ensemble(problem, drafts))\n'),
        "self_refine": ('def solve(problem):\n    draft = answer_generate(problem)\n'
                        '    feedback = review(problem, draft)\n    return format(problem, revise(problem, draft, feedback))\n'),
    },
    "code": {  # the entry point is the last `def name(` of the prompt, as in the generator's example
        "io": (f'def solve(problem):\n    {_CODE_NAME}\n'
               '    return code_generate(problem, name, "Write the function.")\n'),
        "cot": (f'def solve(problem):\n    {_CODE_NAME}\n'
                '    return code_generate(problem, name, "Think step by step, then write the function.")\n'),
        "cot_sc": (f'def solve(problem):\n    {_CODE_NAME}\n'
                   '    drafts = [code_generate(problem, name, "Write the function.") for _ in range(3)]\n'
                   '    return ensemble(problem, drafts)\n'),
        "programmer": (f'def solve(problem):\n    {_CODE_NAME}\n'
                       '    code = code_generate(problem, name, "Write the function.")\n'
                       '    return test(problem, code, name)\n'),
        "self_refine": (f'def solve(problem):\n    {_CODE_NAME}\n'
                        '    code = code_generate(problem, name, "Write the function.")\n'
                        '    feedback = review(problem, code)\n    return revise(problem, code, feedback)\n'),
    },}
BASELINES["mixed"] = BASELINES["math"]  # mixed offers math's operators, so it has math's fixed workflows
