"""Operators that workflows call, the executor client, the static workflow checker and the
generator prompt (DESIGN §3, §4)."""

# ==== executor client (owner: sandbox helper) ====

# ==== operator library (owner: sandbox helper) ====

# ==== static checker and generator prompt (owner: benchmarks helper) ====

import ast as _ast
import re as _re

# What the generator is told about each operator: signature and one line of semantics.
OPERATOR_DOCS = {
    "custom": ("custom(input, instruction)", "the executor follows the instruction on the input"),
    "answer_generate": ("answer_generate(input)", "the executor thinks step by step and ends with the final answer"),
    "programmer": ("programmer(problem, analysis='')", "the executor writes and runs Python code; returns its output"),
    "ensemble": ("ensemble(problem, solutions)", "picks the most consistent answer from a list of solutions"),
    "review": ("review(problem, solution)", "returns a critique of the solution"),
    "revise": ("revise(problem, solution, feedback)", "returns the solution repaired using the feedback"),
    "format": ("format(problem, solution)", "returns only the final answer of the solution"),
    "code_generate": ("code_generate(problem, entry_point, instruction)", "returns Python code defining entry_point"),
    "test": ("test(problem, solution, entry_point)", "runs the public tests, repairs the code if they fail; returns code"),
}
# offered per benchmark family (DESIGN §3, "offered for")
FAMILY_OPERATORS = {
    "math": ("custom", "answer_generate", "programmer", "ensemble", "review", "revise", "format"),
    "qa": ("custom", "answer_generate", "ensemble", "review", "revise", "format"),
    "code": ("custom", "code_generate", "test", "ensemble", "review", "revise"),
}
ALL_OPERATORS = tuple(OPERATOR_DOCS)
SAFE_BUILTINS = frozenset("len range str int float min max sorted enumerate zip list dict set sum abs round "
                          "any all isinstance print".split())

EXAMPLE_WORKFLOWS = {
    "math": '''def solve(problem):
    drafts = [custom(problem, "Think step by step, then give the final answer.") for _ in range(2)]
    drafts.append(programmer(problem))
    return ensemble(problem, drafts)
''',
    "qa": '''def solve(problem):
    answer = answer_generate(problem)
    feedback = review(problem, answer)
    answer = revise(problem, answer, feedback)
    return format(problem, answer)
''',
    "code": '''def solve(problem):
    name = problem.split("def ")[-1].split("(")[0].strip()
    code = code_generate(problem, name, "Write the complete function.")
    return test(problem, code, name)
''',
}


class _Reject(Exception):
    pass


def _line(node):
    return f"(line {getattr(node, 'lineno', '?')})"


def _range_len(node):
    """Iterations of `range(K)` / `range(a, b)` / `range(a, b, s)` with literal ints, else None."""
    if not (isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id == "range"
            and not node.keywords and 1 <= len(node.args) <= 3):
        return None
    vals = [a.value if isinstance(a, _ast.Constant) else None for a in node.args]
    if not all(type(v) is int for v in vals):
        return None
    return len(range(*vals)) if vals[-1] != 0 or len(vals) < 3 else None


def _count_calls(node, ops):
    """Static upper bound on operator calls: literal-range loops multiply their body, an if takes
    its larger branch, a loop that calls operators without a literal bound is rejected."""
    def count(n):
        return _count_calls(n, ops)

    def total(nodes):
        return sum(count(n) for n in nodes)

    if isinstance(node, (_ast.For, _ast.AsyncFor)):
        body = total(node.body)
        k = _range_len(node.iter)
        if k is None and body:
            raise _Reject(f"unbounded loop {_line(node)}")
        return count(node.iter) + (k or 0) * body + total(node.orelse)
    if isinstance(node, (_ast.ListComp, _ast.SetComp, _ast.GeneratorExp, _ast.DictComp)):
        elts = [node.key, node.value] if isinstance(node, _ast.DictComp) else [node.elt]
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
    if isinstance(node, (_ast.If, _ast.IfExp)):
        body, orelse = (node.body, node.orelse) if isinstance(node, _ast.If) else ([node.body], [node.orelse])
        return count(node.test) + max(total(body), total(orelse))
    own = int(isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id in ops)
    return own + total(_ast.iter_child_nodes(node))


def _problem_literals(problem):
    text = str(problem)
    nums = set(_re.findall(r"\d+(?:\.\d+)?", text)) | set(_re.findall(r"\d+(?:\.\d+)?", text.replace(",", "")))
    return text, {n for n in nums if sum(c.isdigit() for c in n) >= 2}


def check_workflow(code, problem=None, allowed_ops=ALL_OPERATORS, max_calls=10):
    """Static check of a generated workflow, before any execution (DESIGN §3).
    Returns (ok, reason); reason is short and names the line, e.g. "import not allowed (line 3)"."""
    try:
        tree = _ast.parse(code)
    except SyntaxError as e:
        return False, f"syntax error (line {e.lineno})"
    except (ValueError, TypeError, MemoryError, RecursionError):  # null bytes, absurd nesting
        return False, "unparsable code"
    ops = set(allowed_ops)
    try:
        for n in _ast.walk(tree):  # first, so a top-level import is named as such
            if isinstance(n, (_ast.Import, _ast.ImportFrom)):
                raise _Reject(f"import not allowed {_line(n)}")
        body = tree.body
        if body and isinstance(body[0], _ast.Expr) and isinstance(body[0].value, _ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]  # a module docstring is fine
        solves = [n for n in body if isinstance(n, _ast.FunctionDef) and n.name == "solve"]
        for n in body:
            if not (isinstance(n, _ast.FunctionDef) and n.name == "solve"):
                raise _Reject(f"top-level code not allowed {_line(n)}")
        if len(solves) != 1:
            raise _Reject("no def solve(problem)" if not solves else f"more than one solve {_line(solves[1])}")
        fn = solves[0]
        a = fn.args
        if (len(a.args) != 1 or a.posonlyargs or a.vararg or a.kwarg or a.kwonlyargs or a.defaults):
            raise _Reject(f"solve must take exactly one argument {_line(fn)}")
        if fn.decorator_list:
            raise _Reject(f"decorator not allowed {_line(fn)}")
        called = {id(n.func) for n in _ast.walk(fn) if isinstance(n, _ast.Call)}
        for n in _ast.walk(fn):
            if n is fn:
                continue
            if isinstance(n, (_ast.Import, _ast.ImportFrom)):
                raise _Reject(f"import not allowed {_line(n)}")
            if isinstance(n, _ast.While):
                raise _Reject(f"while loop not allowed {_line(n)}")
            if isinstance(n, (_ast.FunctionDef, _ast.AsyncFunctionDef, _ast.Lambda, _ast.ClassDef)):
                raise _Reject(f"nested function or class not allowed {_line(n)}")
            if isinstance(n, (_ast.Global, _ast.Nonlocal, _ast.Yield, _ast.YieldFrom, _ast.Await)):
                raise _Reject(f"{type(n).__name__.lower()} not allowed {_line(n)}")
            if isinstance(n, _ast.Name) and "__" in n.id:
                raise _Reject(f"dunder name {n.id} not allowed {_line(n)}")
            if isinstance(n, _ast.Attribute) and n.attr.startswith("_"):
                raise _Reject(f"attribute {n.attr} not allowed {_line(n)}")
            if isinstance(n, _ast.Attribute) and n.attr in ("format", "format_map"):
                raise _Reject(f"str.{n.attr} not allowed {_line(n)}")  # "{0.__class__}".format(x)
            if isinstance(n, _ast.Name) and n.id in ops and isinstance(n.ctx, _ast.Load) and id(n) not in called:
                raise _Reject(f"operator {n.id} must be called directly {_line(n)}")  # sorted(key=review)
            if isinstance(n, _ast.Call):
                if isinstance(n.func, _ast.Name):
                    if n.func.id not in ops and n.func.id not in SAFE_BUILTINS:
                        raise _Reject(f"call to {n.func.id} not allowed {_line(n)}")
                elif not isinstance(n.func, _ast.Attribute):
                    raise _Reject(f"indirect call not allowed {_line(n)}")
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


def _check_copied(fn, text, numbers):
    """No literal copied from the problem: numbers of 2+ digits (alone or inside a string) and
    strings of 8+ characters that occur in the problem text. The workflow must be structure,
    not the answer."""
    for n in _ast.walk(fn):
        if not isinstance(n, _ast.Constant):
            continue
        v = n.value
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            s = repr(abs(v))
            if s in numbers or s.removesuffix(".0") in numbers:
                raise _Reject(f"literal {s} copied from the problem {_line(n)}")
        elif isinstance(v, str):
            if len(v.strip()) >= 8 and v.strip() in text:
                raise _Reject(f"string {v.strip()[:20]!r} copied from the problem {_line(n)}")
            for num in _re.findall(r"\d+(?:\.\d+)?", v):
                if num in numbers:
                    raise _Reject(f"literal {num} copied from the problem {_line(n)}")


def extract_code(completion):
    """Code of the first ```python (or ```py) block, else of the first ``` block of any kind; a
    missing closing fence is fine (generation stopped). None when there is no fence. With a
    prefill, pass prefill + completion."""
    for pat in (r"```[ \t]*(?:python|py)[ \t]*\r?\n(.*?)(?:```|\Z)", r"```[^\n`]*\r?\n(.*?)(?:```|\Z)"):
        m = _re.search(pat, completion, flags=_re.S | _re.I)
        if m:
            return m.group(1)
    return None


# The completion starts inside the code block: a 135M generator otherwise often chats instead
# of writing code (see the measurement in the report of issue 5).
PREFILL = "```python\ndef solve(problem):\n"

SYSTEM_PROMPT = ("You write Python workflows. A workflow is a function solve(problem) that solves a problem "
                 "by calling operators; each operator asks a language model and returns a string.")


def build_prompt(problem, family, operators=None, max_calls=10):
    """Chat messages asking the generator for one workflow for `problem` (DESIGN §3): the role,
    the operator catalogue, one example workflow, the rules, then the problem."""
    if family not in FAMILY_OPERATORS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILY_OPERATORS)}")
    ops = list(operators or FAMILY_OPERATORS[family])
    catalogue = "\n".join(f"- {OPERATOR_DOCS[o][0]}: {OPERATOR_DOCS[o][1]}" for o in ops)
    user = (f"Operators:\n{catalogue}\n\n"
            f"Example workflow:\n```python\n{EXAMPLE_WORKFLOWS[family]}```\n\n"
            f"Rules: define only solve(problem); call only the operators above and simple builtins; "
            f"no import; at most {max_calls} operator calls; loops only over range(N); "
            f"never copy numbers or text from the problem, pass `problem` instead.\n\n"
            f"Problem:\n{problem}\n\n"
            f"Write a workflow for this problem as one ```python block.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
