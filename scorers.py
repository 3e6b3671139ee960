"""Scorers: a workflow's final answer against a problem's gold answer, in [0, 1] (ARCHITECTURE §5).

    python -c "import scorers; print(scorers.score_number('so the answer is 1,000', '1000'))"    # 1.0
    python -c "import scorers; print(scorers.score_math('\\boxed{\\frac{1}{2}}', '0.5'))"          # 1.0

Numbers: the last number of the answer within 1e-6 (absolute). MATH: the boxed or last expression,
numeric then symbolic (sympy) equivalence. QA: SQuAD token F1. Code: the benchmark's hidden tests
in the sandbox. benchmarks.score picks the scorer of a benchmark.
"""
import re
import string
from collections import Counter


import sandbox

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
# The mark a reply sets before its final answer: "Answer:", "the answer is", "Final answer =".
# mixed.final_segment reads what follows the last one, operators.op_format strips one that opens a
# reply. Two readers keep narrower marks, their comments say why: operators.extract_answer and
# math_answers.
ANSWER_MARK = r"(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*"


def last_number(text):
    """The last number in text as a float: '1,000' -> 1000, '$18.00' -> 18, '50%' -> 50."""
    nums = NUMBER.findall(str(text))
    return float(nums[-1].replace(",", "")) if nums else None


def score_number(answer, gold, tol=1e-6):
    # absolute tolerance: a relative one would accept 1450001 for 1450000
    a, g = last_number(answer), last_number(gold)
    return float(a is not None and g is not None and abs(a - g) <= tol)


def last_boxed(text):
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces ok), or of `\\boxed 5`."""
    i, j = max((text.rfind(m), text.rfind(m) + len(m)) for m in ("\\boxed", "\\fbox"))
    if i < 0:
        return None
    if text[j:j + 1] == " ":
        m = re.match(r"\s*([^\s$]+)", text[j:])
        return m.group(1) if m else None
    if text[j:j + 1] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None  # unbalanced


def math_answers(text):
    """Candidate final answers of a MATH-style response: the last \\boxed{} if there is one;
    else the whole text (a bare answer such as a format() result), what follows 'answer is',
    and the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return [boxed]
    cands = [text]
    # "answer is" only, not every ANSWER_MARK: each match adds a candidate, so a wider mark could only
    # raise MATH scores, and those measured so far were scored with this one
    m = re.findall(r"answer is[:\s]*([^\n]+)", text, flags=re.I)
    if m:
        cands.append(m[-1].strip().rstrip("."))
    nums = NUMBER.findall(text)
    if nums:
        cands.append(nums[-1])
    return cands


def _unwrap(s, cmd, repl):
    """Replace every \\cmd{X} (X may hold nested braces) by repl(X)."""
    out, i, tag = "", 0, "\\" + cmd + "{"
    while True:
        j = s.find(tag, i)
        if j < 0:
            return out + s[i:]
        k, depth = j + len(tag), 1
        while k < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[k], 0)
            k += 1
        if depth:
            return out + s[i:]  # unbalanced: leave as is
        out += s[i:j] + repl(s[j + len(tag):k - 1])
        i = k


def normalize_math(s):
    """Canonical string form of a MATH answer: strip TeX spacing, \\left/\\right, \\text{},
    units, degrees, dollars, percent, 'x =', thousands commas; \\dfrac/\\tfrac -> \\frac."""
    s = str(s).strip().strip("$").strip()
    s = s.replace("\n", " ").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = re.sub(r"\\(left|right)(?![a-zA-Z])", "", s)
    # a trailing \text{ units} after the value is a unit ("5\text{ cm}^2"); a lone \text{(B)} is the answer
    s = re.sub(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}(\^\{?\d\}?)?\s*$", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    for cmd in ("text", "textbf", "mathrm", "mbox", "textnormal", "mathbf"):
        s = _unwrap(s, cmd, lambda x: " " + x + " ")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\ ", " ").replace("~", " ").strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)", "", s)  # leading "x = "
    m = re.fullmatch(r"(-?[\d.,]*\d)\s*(?:[a-zA-Z]+\.?\s*)+(?:\^\{?\d\}?)?", s)  # "5 cm^2", "30 degrees"
    if m:
        s = m.group(1)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "").replace("{,}", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)  # multiple choice "(B)" -> "B"
    return m.group(1).upper() if m else s


def _simple_float(s):
    """float of '3', '-0.5', '.5', '\\frac{1}{2}', '-\\frac{3}{4}', '3/4'; else None."""
    try:
        return float(s)
    except ValueError:
        pass
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?)(-?[\d.]+)/(-?[\d.]+)", s)
    if m:
        try:
            v = float(m.group(2)) / float(m.group(3))
            return -v if m.group(1) else v
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _tex_arg(s, i):
    """(argument, end) of a TeX macro argument at s[i]: a {group} (nested ok) or one char."""
    if s[i:i + 1] != "{":
        return s[i:i + 1], i + 1
    depth = 0
    for k in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[k], 0)
        if depth == 0:
            return s[i + 1:k], k + 1
    raise ValueError("unbalanced braces")


def _tex_to_expr(s):
    """\\frac{a}{b} -> ((a)/(b)), \\sqrt{a} -> sqrt(a), \\sqrt[n]{a} -> (a)**(1/(n)), recursively."""
    out, i = "", 0
    while i < len(s):
        if s.startswith("\\frac", i):
            a, i = _tex_arg(s, i + 5)
            b, i = _tex_arg(s, i)
            out += f"(({_tex_to_expr(a)})/({_tex_to_expr(b)}))"
        elif s.startswith("\\sqrt[", i):
            n, rest = s[i + 6:].split("]", 1)
            a, j = _tex_arg(rest, 0)
            out += f"root({_tex_to_expr(a)},{_tex_to_expr(n)})"
            i = len(s) - len(rest) + j
        elif s.startswith("\\sqrt", i):
            a, i = _tex_arg(s, i + 5)
            out += f"sqrt({_tex_to_expr(a)})"
        else:
            out += s[i]
            i += 1
    return out


def _latex_to_python(s):
    """A small LaTeX -> Python-expression rewrite for sympy; None when it is not plain algebra.
    The result may hold only digits, letters, + - * / ( ) . , and no long names, so sympy's
    parser (which evaluates its input) never sees anything but arithmetic."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = s.replace("\\pi", "pi").replace("\\infty", "oo")
    try:
        s = _tex_to_expr(s)
    except (ValueError, IndexError):
        return None
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    if "\\" in s or "__" in s or not re.fullmatch(r"[0-9a-zA-Z+\-*/().,\s]*", s):
        return None
    if any(len(w) > 1 and w not in ("sqrt", "root", "pi", "oo") for w in re.findall(r"[a-zA-Z]+", s)):
        return None
    for m in re.finditer(r"\*\*\s*", s):  # exponents: small number, one letter, or (group without **)
        tail = s[m.end():]
        if re.match(r"-?(\d{1,2}(?!\d)|[a-zA-Z](?![a-zA-Z]))", tail):
            continue
        if not tail.startswith("(") or "**" in _paren_group(tail):
            return None  # no towers like 9**9**9: sympy would compute them exactly
    return s


def _paren_group(s):
    depth = 0
    for k, ch in enumerate(s):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return s[:k + 1]
    return s


def _sympy_equal(a, b):
    """Symbolic equivalence via sympy, guarded: short inputs only, any failure -> False."""
    if max(len(a), len(b)) > 80:
        return False
    pa, pb = _latex_to_python(a), _latex_to_python(b)
    if not pa or not pb or pa.count("(") != pa.count(")") or pb.count("(") != pb.count(")"):
        return False
    # imported here, the one documented exception to imports at the top (tests/test_layout.py):
    # sympy costs ~0.5-1 s to import, only the MATH scorer needs it, and every workflow runner
    # (operators.py, through scorers.extract_code) would pay it at start-up
    import sympy
    from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations
    try:
        tr = standard_transformations + (implicit_multiplication_application,)
        ea, eb = parse_expr(pa, transformations=tr), parse_expr(pb, transformations=tr)
        if isinstance(ea, tuple) or isinstance(eb, tuple):  # tuples / coordinates: elementwise
            return (isinstance(ea, tuple) and isinstance(eb, tuple) and len(ea) == len(eb)
                    and all(sympy.simplify(x - y) == 0 for x, y in zip(ea, eb)))
        diff = ea - eb
        if not diff.free_symbols:
            return abs(complex(diff.evalf())) < 1e-6
        return sympy.simplify(diff) == 0
    except Exception:  # parser errors, TypeError on tuples, ... : not provably equal
        return False


def math_equal(a, g):
    """Are two normalised MATH answers equal: as strings, as numbers, or symbolically."""
    if a == g:
        return True
    fa, fg = _simple_float(a), _simple_float(g)
    if fa is not None and fg is not None:
        return abs(fa - fg) <= 1e-6
    return _sympy_equal(a, g)


def score_math(answer, gold):
    g = normalize_math(gold)
    return float(any(math_equal(normalize_math(c), g) for c in math_answers(answer)))


def normalize_qa(s):
    s = str(s).lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(answer, gold):
    pred, ref = normalize_qa(answer).split(), normalize_qa(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def code_program(row, answer):
    """The program that scores a code answer: (HumanEval prompt, so helper functions and imports
    exist; the answer's own def overrides the stub) + answer + hidden test + the check call."""
    code = extract_code(answer) or answer
    head = "\n".join(row.get("test_imports", []))
    if "prompt" in row and f"def {row['entry_point']}" not in code:
        head += "\n" + row["prompt"]  # the answer is a function body: complete the prompt's def
    elif "prompt" in row:
        head += "\n" + row["prompt"] + "    pass\n"
    call = f"check({row['entry_point']})" if re.search(r"def check\(\s*\w", row["test"]) else "check()"
    return f"{head}\n{code}\n\n{row['test']}\n\n{call}\n"


def score_code(row, answer, timeout=10):
    if not (extract_code(answer) or answer).strip():
        return 0.0
    res = sandbox.run_program(code_program(row, answer), timeout=timeout)
    return float(bool(res.get("ok")))


def extract_code(completion):
    """Code of the first ```python (or ```py) block, else of the first ``` block of any kind; a
    missing closing fence is fine (generation stopped). None when there is no fence. With a
    prefill, pass prefill + completion."""
    for pat in (r"```[ \t]*(?:python|py)[ \t]*\r?\n(.*?)(?:```|\Z)", r"```[^\n`]*\r?\n(.*?)(?:```|\Z)"):
        m = re.search(pat, completion, flags=re.S | re.I)
        if m:
            return m.group(1)
    return None
