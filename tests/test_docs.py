"""The docs name what exists (issue 23). Every documented command names only flags its script
has: each `python X.py ...` of README.md, ARCHITECTURE.md and the module docstrings of the
top-level scripts (and, in the two .md files, each inline code span that starts with
`X.py --flag`) is checked against the options its real --help lists (its sub-command's, for
`python bench.py gpu ...` or `python benchmarks.py show ...`). Every `module.name` of the docs,
comments and docstrings exists, and ARCHITECTURE §2's import diagram is the import graph.

    python -m pytest -q tests/test_docs.py

The help texts come from one fresh interpreter (sys.executable, cwd the repo root) that runs each
script as __main__ with `--help` (runpy, as `python X.py --help` does), so torch is imported once,
not once per script: a dozen separate `--help` processes took ~17 s each on a loaded 2-core box.
"""
import ast
import functools
import io
import json
import re
import subprocess
import sys
import tokenize

import test_layout  # its import graph, read with ast
from conftest import ROOT

SCRIPT = re.compile(r"\bpython3?\s+(\w+)\.py\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# the child: argv lists in (JSON on stdin), {argv string: [exit status, help text]} out. The help
# leaves out each parser's description and epilog: a script's description is its docstring, so the
# docstring's own commands would otherwise find their flags in it.
HELPER = r"""
import argparse, contextlib, io, json, runpy, sys
format_help = argparse.ArgumentParser.format_help
def without_prose(parser):
    kept, parser.description, parser.epilog = (parser.description, parser.epilog), None, None
    try:
        return format_help(parser)
    finally:
        parser.description, parser.epilog = kept
argparse.ArgumentParser.format_help = without_prose
out = {}
for argv in json.load(sys.stdin):
    buf, rc = io.StringIO(), 0
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:
        rc, buf = 1, io.StringIO(f"{type(e).__name__}: {e}")
    out[" ".join(argv)] = [rc, buf.getvalue()]
print(json.dumps(out))
"""


def code_spans(md):
    """Fenced blocks (line by line, backslash continuations joined) and inline code spans (which may
    wrap across lines) of a markdown text: [(line number, text)]."""
    spans, fenced = [], []
    for m in re.finditer(r"^```[^\n]*\n(.*?)^```", md, flags=re.S | re.M):
        line = md.count("\n", 0, m.start()) + 2
        for k, text in enumerate(m.group(1).replace("\\\n", " ").split("\n")):
            spans.append((line + k, text))
        fenced.append(m.span())
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", md):
        if not any(a <= m.start() < b for a, b in fenced):
            spans.append((md.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")))
    return spans


def commands(text, where, inline=False):
    """[(where, script, first positional or None, [flags])] of the `python X.py ...` commands in
    `text`; with inline, also of a text that starts with `X.py --flag`. A command ends at a '#'
    comment, a newline or the next command."""
    out = []
    for line in text.splitlines():
        starts = [(m.start(), m.group(1)) for m in SCRIPT.finditer(line)]
        if inline and not starts and (m := re.match(r"\s*(\w+)\.py\s+--", line)):
            starts = [(m.start(), m.group(1))]
        for k, (i, script) in enumerate(starts):
            end = starts[k + 1][0] if k + 1 < len(starts) else len(line)
            args = line[i:end].split("#")[0].split(f"{script}.py", 1)[1]
            words = [w.strip("[]()`'\",;") for w in args.split()]
            first = words[0] if words and words[0] and not words[0].startswith("-") else None
            out.append((where, script, first, FLAG.findall(args)))
    return out


def documented():
    found = []
    for name in ("README.md", "ARCHITECTURE.md"):
        for line, text in code_spans((ROOT / name).read_text(encoding="utf-8")):
            found += commands(text, f"{name}:{line}", inline=True)
    for path in sorted(ROOT.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        found += commands(doc, f"{path.name} (docstring)")
    return found


def help_keys(cmds):
    """The argvs whose --help `cmds` need: each script alone, and with its first positional word."""
    return {(f"{s}.py",) for _, s, _, _ in cmds} | {(f"{s}.py", f) for _, s, f, _ in cmds if f}


# the invented sub-command of test_an_invented_flag_or_subcommand_is_caught, asked for with the rest
PROBES = [("doc", "benchmarks", "shwo", [])]


@functools.lru_cache(maxsize=None)
def helps():
    """{argv string: (exit status, text)} of `python <argv> --help` for every documented command
    (and PROBES), all from one child interpreter."""
    argvs = [list(k) + ["--help"] for k in sorted(help_keys(documented() + PROBES))]
    p = subprocess.run([sys.executable, "-c", HELPER], input=json.dumps(argvs), capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return {k: tuple(v) for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}


def help_text(s, f):
    """(exit status, help text) of `python s.py [f] --help`: the sub-command's help where `f` is one
    (`bench.py gpu`); a script without sub-commands prints its own help whatever that word is, and
    a placeholder it refuses (`download.py NAME`) falls back to the script's help."""
    got = helps()
    rc, text = got[" ".join([f"{s}.py"] + ([f] if f else []) + ["--help"])]
    if rc != 0 and f and f.isupper():  # NAME, MODEL, PROGRAM: a placeholder, not a sub-command
        rc, text = got[f"{s}.py --help"]
    return rc, text


def options(text):
    """The option strings a --help lists: the invocation column of its option lines (indented two
    spaces, e.g. `  --executor EXECUTOR, --executor-url EXECUTOR   help...`), not the help texts."""
    return {f for line in text.splitlines() if re.match(r"  -", line)
            for f in FLAG.findall(re.split(r"\s{2,}", line.strip())[0])}


def missing_flags(cmds):
    bad = []
    for where, s, f, flags in cmds:
        rc, text = help_text(s, f)
        what = f"python {s}.py" + (f" {f}" if f else "")
        if rc != 0:
            bad.append(f"{where}: `{what} --help` exits {rc}: {text.strip()[-300:]}")
            continue
        bad += [f"{where}: {what} has no {flag}" for flag in flags if flag not in options(text)]
    return bad


def test_the_collector_finds_commands_subcommands_and_flags():
    md = ("x\n```bash\npython bench.py gpu --models 7b --json   # one shape --not-a-flag\n"
          "python train.py --iter 3 \\\n    --kl full\n```\nsee `python curate.py --run R\n--iter K` and "
          "`evaluate.py --baseline`, not `collect.py`\n")
    got = [c[1:] for line, text in code_spans(md) for c in commands(text, line, inline=True)]
    assert got == [("bench", "gpu", ["--models", "--json"]), ("train", None, ["--iter", "--kl"]),
                   ("curate", None, ["--run", "--iter"]), ("evaluate", None, ["--baseline"])]
    assert [c[1:] for c in commands("OMP_NUM_THREADS=1 python sandbox.py prog.py --timeout 5", "x")] == \
           [("sandbox", "prog.py", ["--timeout"])]


def test_an_invented_flag_or_subcommand_is_caught():
    cmds = [("doc", "curate", None, ["--iter", "--no-such-flag"]), ("doc", "benchmarks", "show", ["--split"])]
    bad = missing_flags(cmds + PROBES)
    assert len(bad) == 2 and "curate.py has no --no-such-flag" in bad[0] and "shwo --help` exits 2" in bad[1], bad


def test_documented_commands_name_real_flags():
    cmds = documented()
    assert len({c[1] for c in cmds}) >= 12, cmds  # the collector still finds the scripts' commands
    bad = missing_flags(cmds)
    assert not bad, "documented flags the script does not have:\n" + "\n".join(bad)


# `module.name` in prose that is not this repository's: Hugging Face config attributes and modules
NOT_OURS = {"config.logit_scale", "config.logits_scaling", "model.config", "model.layers"}
# left for the loss-interface change, which moves these names (issue 23)


def top_level_names(path):
    """The names a module defines or imports at its top level (what `module.name` can reach)."""
    names = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.col_offset == 0:
            names.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and n.col_offset == 0:
            for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                names |= {x.id for x in ast.walk(t) if isinstance(x, ast.Name)}
        elif isinstance(n, (ast.Import, ast.ImportFrom)) and n.col_offset == 0:
            names |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return names


def prose(path):
    """[(line, text)]: a .md file's lines; a .py file's comments and docstrings."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return list(enumerate(text.splitlines(), 1))
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
           if t.type == tokenize.COMMENT]
    for n in ast.walk(ast.parse(text)):
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(n):
            line = n.body[0].lineno
            out += [(line + k, l) for k, l in enumerate(ast.get_docstring(n, clean=False).splitlines())]
    return out


def test_dotted_names_in_the_docs_exist():
    """Every `module.name` that README.md, ARCHITECTURE.md or a comment or docstring (tests too)
    names, for a module of this repository, is something that module defines or imports."""
    defined = {p.stem: top_level_names(p) for p in ROOT.glob("*.py")}
    ref = re.compile(r"(?<![\w.])(" + "|".join(sorted(defined)) + r")\.([A-Za-z_]\w*)")
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + [ROOT / "README.md", ROOT / "ARCHITECTURE.md"]
    bad = [f"{p.relative_to(ROOT)}:{line}: {m.group(0)}" for p in files for line, text in prose(p)
           for m in ref.finditer(text) if m.group(2) not in ("py", "md", "json", "jsonl", "png", "gz")
           and m.group(2) not in defined[m.group(1)] and m.group(0) not in NOT_OURS]
    assert not bad, "names that do not exist (moved or renamed?):\n" + "\n".join(bad)


def test_the_import_diagram_is_the_import_graph():
    """ARCHITECTURE §2's "Imports, bottom to top" block lists every project import, and each file
    only imports files on lines above it."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"Imports, bottom to top.*?\n```\n(.*?)```", text, flags=re.S).group(1)
    drawn, row = {}, {}
    for k, line in enumerate(block.splitlines()):
        for name, deps in re.findall(r"(\w+)(?: ← ((?:\w+, )*\w+))?", line):
            drawn[name], row[name] = sorted(deps.split(", ")) if deps else [], k
    assert drawn == test_layout.graph()
    late = [f"{a} ← {b}" for a, deps in drawn.items() for b in deps if row[b] >= row[a]]
    assert not late, f"not drawn below what they import: {late}"
