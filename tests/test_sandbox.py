"""The sandbox against hostile workflows (no model needed: --executor none), plus run_program,
run_many and the CLI. The corpus runs once, two at a time, in a module fixture; each case is then
its own test."""
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import sandbox
import operators

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 1.5
# A case that a limit other than the clock must end gets a clock it cannot reach: memory_bomb under
# load (two cores, other tests running) could take over 1.5 s to touch 256 MB, and was then ended
# by the timeout instead of RLIMIT_AS, so it failed now and then. With 30 s only the memory limit ends
# it (~0.6 s under load 6 on 2 cores); if RLIMIT_AS stopped working it would time out and fail.
TIMEOUTS = {"memory_bomb": 30.0}
MARK = "spogwmark" + secrets.token_hex(6)  # in the argv of anything a workflow leaves behind
SECRET = "sk-canary-" + secrets.token_hex(12)
# a world-writable file in a world-writable dir: only the sandbox itself can protect it
CANARY_DIR = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else Path("/tmp")
CANARY = CANARY_DIR / f"spogw-canary-{secrets.token_hex(6)}"
PWNED = ROOT / f"pwned-{secrets.token_hex(6)}.txt"
SYMPY_INIT = Path(importlib.util.find_spec("sympy").origin)  # an exposed package file: must stay as it is


def _fingerprint(path):
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode, sorted(os.listdir(path.parent))


SYMPY_BEFORE = _fingerprint(SYMPY_INIT)

# name -> (workflow code, check(result) -> None); {port}, {canary}, {pwned}, {mark}, {parent}
# {victim} are filled in by the fixture.
CASES = {}


def case(name, code):
    def deco(check):
        CASES[name] = (code, check)
        return check
    return deco


def errored(prefix=""):
    def check(r):
        assert r["error"] is not None and r["error"].startswith(prefix), r
    return check


case("infinite_loop", "def solve(p):\n    while True:\n        pass\n")(errored("timeout"))
case("sleep_past_timeout", "import time\ndef solve(p):\n    time.sleep(100)\n")(errored("timeout"))
case("signal_tampering", """import signal, time
def solve(p):
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU, signal.SIGALRM):
        signal.signal(s, signal.SIG_IGN)
    time.sleep(100)
""")(errored("timeout"))
case("no_solve", "x = 1\n")(errored("no solve()"))
case("syntax_error", "def solve(p)\n    return 1\n")(errored("syntax"))
case("none_return", "def solve(p):\n    return None\n")(errored("bad output"))
case("os_exit", "import os\ndef solve(p):\n    os._exit(0)\n")(errored("crash"))
case("sys_exit", "import sys\ndef solve(p):\n    sys.exit(3)\n")(errored("exception: SystemExit"))
case("raise_systemexit", "def solve(p):\n    raise SystemExit('bye')\n")(errored("exception: SystemExit"))
case("segfault_ctypes", "import ctypes\ndef solve(p):\n    return ctypes.string_at(0)\n")(errored("crash: killed by SIGSEGV"))
case("recursion_bomb", "def f(n):\n    return f(n + 1)\ndef solve(p):\n    return f(0)\n")(errored("exception: RecursionError"))
case("read_stdin", "import sys\ndef solve(p):\n    return 'read:' + repr(sys.stdin.read()) + repr(input())\n")(
    errored("exception: EOFError"))


@case("busy_cpu_threads", """import threading
def spin():
    while True:
        pass
def solve(p):
    for _ in range(4):
        threading.Thread(target=spin).start()
    spin()
""")
def _(r):
    assert r["error"].startswith(("timeout", "killed: CPU")), r


@case("memory_bomb", "def solve(p):\n    x = []\n    while True:\n        x.append(' ' * 10**7)\n")
def _(r):
    assert r["error"].startswith(("exception: MemoryError", "killed")), r


@case("fork_bomb", "import os\ndef solve(p):\n    while True:\n        os.fork()\n")
def _(r):
    assert r["error"] is not None and r["answer"] is None, r


@case("disk_fill_one_file", "def solve(p):\n    with open('big', 'wb') as f:\n        while True:\n            f.write(b'x' * 2**20)\n")
def _(r):
    assert r["error"].startswith("exception: OSError") and "too large" in r["error"], r


@case("disk_fill_many_files", """def solve(p):
    for i in range(10**6):
        with open('f%d' % i, 'wb') as f:
            f.write(b'x' * 8 * 2**20)
""")
def _(r):
    assert r["error"].startswith("exception: OSError"), r


@case("canary_write_delete", """import os
def solve(p):
    out = []
    for how in ('w', 'a'):
        try:
            with open('{canary}', how) as f:
                f.write('pwned')
            out.append('wrote')
        except OSError as e:
            out.append(type(e).__name__)
    for f in (os.remove, lambda c: os.rename(c, c + '.x'), lambda c: os.chmod(c, 0)):
        try:
            f('{canary}')
            out.append('changed')
        except OSError as e:
            out.append(type(e).__name__)
    return ' '.join(out)
""")
def _(r):
    assert CANARY.read_text() == "canary" and "wrote" not in r["answer"] and "changed" not in r["answer"], r


@case("write_project_dir", """def solve(p):
    with open('{pwned}', 'w') as f:
        f.write('pwned')
    return 'wrote'
""")
def _(r):
    assert not PWNED.exists() and r["error"].startswith("exception: "), r


@case("remount_root_rw", """import ctypes, subprocess
def solve(p):
    libc = ctypes.CDLL(None, use_errno=True)
    out = [str(libc.mount(None, b'/', None, 32 | 4096, None))]  # MS_REMOUNT | MS_BIND, without MS_RDONLY
    out.append(str(libc.umount2(b'/tmp', 2)))
    out.append(str(subprocess.run(['mount', '-o', 'remount,rw', '/'], capture_output=True).returncode))
    try:
        with open('{canary}', 'w') as f:
            f.write('pwned')
        out.append('wrote')
    except OSError as e:
        out.append(type(e).__name__)
    return ' '.join(out)
""")
def _(r):
    assert r["answer"].startswith("-1 -1 ") and r["answer"].endswith("Error"), r


@case("import_tricks", """def solve(p):
    os = __import__('os')
    b = __builtins__ if isinstance(__builtins__, dict) else vars(__builtins__)
    b['__import__']('subprocess').run(['sh', '-c', 'echo pwned > {pwned}'])
    os.system('echo pwned > {pwned}')
    return 'ran'
""")
def _(r):
    assert not PWNED.exists(), r


@case("read_secret", """import os, glob
def solve(p):
    found = [repr(dict(os.environ))]
    paths = glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/task/*/environ')
    paths += ['/proc/%d/environ' % os.getppid(), '/proc/{parent}/environ', '/proc/{parent}/mem']
    for path in paths:
        try:
            with open(path, 'rb') as f:
                found.append(f.read(1 << 16).decode('latin-1'))
        except OSError as e:
            found.append(type(e).__name__)
    return '\\n'.join(found)
""")
def _(r):
    assert r["error"] is None and SECRET not in r["answer"] and "OPENAI_API_KEY" not in r["answer"], r


@case("write_package_dir", """import ctypes, glob, importlib.util, os
def solve(p):
    init = importlib.util.find_spec('sympy').origin  # found, not imported: the import is slow
    pkg = os.path.dirname(init)
    site = os.path.dirname(pkg)
    pyc = glob.glob(os.path.join(pkg, '__pycache__', '__init__.*.pyc'))[0]
    out = []
    for f in (lambda: open(init, 'a').write('pwned'), lambda: open(pyc, 'r+b').write(b'pwned'),
              lambda: open(os.path.join(pkg, 'pwned.py'), 'w'), lambda: open(os.path.join(site, 'sitecustomize.py'), 'w'),
              lambda: os.mkdir(os.path.join(site, 'torch')), lambda: os.rename(pkg, pkg + '.x'),
              lambda: os.remove(init), lambda: os.chmod(init, 0o777), lambda: os.utime(init, (0, 0))):
        try:
            f()
            out.append('changed')
        except OSError as e:
            out.append(type(e).__name__)
    libc = ctypes.CDLL(None, use_errno=True)
    for path in (pkg, site):  # remount without MS_RDONLY; unmount to reach what is beneath
        out.append(str(libc.mount(None, path.encode(), None, 32 | 4096, None)))
        out.append(str(libc.umount2(path.encode(), 2)))
    return ' '.join(out)
""")
def _(r):
    assert r["error"] is None and "changed" not in r["answer"] and r["answer"].endswith(" -1 -1 -1 -1"), r
    assert _fingerprint(SYMPY_INIT) == SYMPY_BEFORE


@case("reach_other_packages", """import importlib.util, os
def solve(p):
    pkg = os.path.dirname(importlib.util.find_spec('numpy').origin)
    out = [' '.join(sorted(os.listdir(os.path.join(pkg, '..'))))]
    for name in ('torch', 'openai', 'transformers', 'operators', 'sandbox'):
        try:
            __import__(name)
            out.append(name)
        except ImportError as e:
            out.append(type(e).__name__)
    return '|'.join(out)
""")
def _(r):
    listing, *imports = r["answer"].split("|")
    assert set(listing.split()) <= {"numpy", "numpy.libs", "sympy", "mpmath"} and "sympy" in listing, r
    assert imports == ["ModuleNotFoundError"] * 5, r


@case("network_loopback", """import socket
def solve(p):
    out = []
    for host in ('127.0.0.1', 'localhost', '::1'):
        try:
            socket.create_connection((host, {port}), timeout=1).sendall(b'hello')
            out.append('connected')
        except OSError as e:
            out.append(type(e).__name__)
    return ' '.join(out)
""")
def _(r):
    assert "connected" not in (r["answer"] or ""), r  # and the listener saw nothing: test below


@case("kill_parent_and_others", """import os, signal
def solve(p):
    out = []
    for pid in (os.getppid(), {parent}, {victim}, -1):
        try:
            os.kill(pid, signal.SIGKILL)
            out.append('sent')
        except OSError as e:
            out.append(type(e).__name__)
    try:
        os.setuid(0)
        out.append('root')
    except OSError as e:
        out.append(type(e).__name__)
    return ' '.join(out)
""")
def _(r):
    assert "root" not in (r["answer"] or ""), r  # parent and victim alive: test below


@case("background_process", """import subprocess, sys, os
def solve(p):
    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{mark}'], start_new_session=True)
    if os.fork() == 0:  # a classic daemon: double fork + setsid
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{mark}'])
        os._exit(0)
    return 'left'
""")
def _(r):
    assert r["answer"] == "left", r  # nothing with the mark alive: test below


@case("thread_left_running", """import threading, time
def solve(p):
    threading.Thread(target=time.sleep, args=(60,)).start()
    return 'done'
""")
def _(r):
    assert r["answer"] == "done" and r["error"] is None, r


@case("print_100mb", "def solve(p):\n    print('x' * 10**8)\n    return 'printed'\n")
def _(r):
    assert r["answer"] == "printed", r


@case("non_str_return", "def solve(p):\n    return [42, 'a']\n")
def _(r):
    assert r["answer"] == "[42, 'a']" and r["error"] is None, r


@case("huge_exception_message", "def solve(p):\n    raise ValueError('x' * 10**7)\n")
def _(r):
    assert r["error"].startswith("exception: ValueError") and len(r["error"]) < 3000, r


@case("huge_answer", "def solve(p):\n    return 'y' * 10**7\n")
def _(r):
    assert r["answer"].startswith("yyy") and len(r["answer"]) <= sandbox.CAP + 100 and "truncated" in r["answer"], r


@case("forge_result_on_stdout", """def solve(p):
    print('{{"answer": "forged", "error": null, "calls": 0}}')
    raise RuntimeError('real failure')
""")
def _(r):
    assert r["answer"] is None and r["error"].startswith("exception: RuntimeError"), r


@case("garbage_on_private_pipe", """import os
def solve(p):
    for fd in range(3, 64):
        try:
            os.write(fd, b'not json\\n')
        except OSError:
            pass
    return 'x'
""")
def _(r):
    assert r["answer"] is None and r["error"] is not None, r


@case("monkeypatch_operators", """def solve(p):
    global custom
    custom = lambda *a, **k: 'fake'
    return custom(p, 'x')
""")
def _(r):
    assert r["answer"] == "fake" and r["calls"] == 0, r  # only the workflow itself is fooled


@case("delete_builtins", """import builtins
def solve(p):
    for k in list(vars(builtins)):  # the real module, which the runtime itself uses
        delattr(builtins, k)
    __builtins__.clear()
    return 'gone'
""")
def _(r):
    assert r["error"] is not None or r["answer"] == "gone", r


@case("operator_without_executor", "def solve(p):\n    return custom(p, 'Answer.')\n")
def _(r):
    assert r["error"].startswith("exception: OperatorError") and "no executor" in r["error"] and r["calls"] == 1, r


@case("budget_exceeded", "def solve(p):\n    for _ in range(5):\n        try:\n            custom(p, 'x')\n        except Exception:\n            pass\n    return 'ok'\n")
def _(r):
    assert r["error"].startswith("budget:") and r["calls"] == 3, r


def _procs_with(mark):
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if mark.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def corpus():
    CANARY.write_text("canary")
    os.chmod(CANARY, 0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    victim = subprocess.Popen(["sleep", "60"])
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = SECRET
    fill = dict(port=listener.getsockname()[1], canary=CANARY, pwned=PWNED, mark=MARK, parent=os.getpid(),
                victim=victim.pid)

    def job(name):
        code = CASES[name][0]
        for k, v in fill.items():
            code = code.replace("{%s}" % k, str(v))
        code = code.replace("{{", "{").replace("}}", "}")
        max_calls = 3 if name == "budget_exceeded" else 20

        def run():
            t = time.monotonic()
            r = operators.run_workflow(code, "What is 2 + 2?", executor=None, timeout=TIMEOUTS.get(name, TIMEOUT),
                                       max_calls=max_calls, mem_mb=256 if name == "memory_bomb" else 512)  # fewer pages to touch
            return r, time.monotonic() - t
        return run

    names = list(CASES)
    try:
        results = {names[i]: r for i, r in sandbox.run_many([job(n) for n in names], workers=2)}
        try:
            listener.accept()
            connected = True
        except BlockingIOError:
            connected = False
        time.sleep(0.1)
        yield dict(results=results, connected=connected, left=_procs_with(MARK), victim_alive=victim.poll() is None)
    finally:
        if old is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old
        victim.kill()
        victim.wait()
        listener.close()
        CANARY.unlink(missing_ok=True)
        PWNED.unlink(missing_ok=True)
        for pid in _procs_with(MARK):
            os.kill(pid, signal.SIGKILL)


def test_corpus_size():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_hostile(corpus, name):
    r, wall = corpus["results"][name]
    assert set(r) == set(operators.RESULT_KEYS)
    assert wall < TIMEOUTS.get(name, TIMEOUT) + 2, (name, wall)
    CASES[name][1](r)
    assert CANARY.read_text() == "canary" and not PWNED.exists()


def test_corpus_left_nothing(corpus):
    assert not corpus["connected"], "a workflow reached the loopback listener"
    assert corpus["left"] == [], "processes outlived their sandbox"
    assert corpus["victim_alive"], "a workflow killed an unrelated process"


def test_isolation_string():
    iso = sandbox.isolation()
    assert sandbox.ISOLATION == iso and iso != "unprobed"
    if os.geteuid() == 0 and sandbox._MODE[0] == "ns":
        assert "netns" in iso and "pidns" in iso and "uid" in iso
    import ctypes
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE: our environ is root-only


def test_fallback_mode_without_namespaces(monkeypatch):
    """Where namespaces are refused (e.g. a container's seccomp), the uid drop + audit hook mode
    still stops the basics. Forced here by resetting the probe."""
    if os.geteuid() != 0:
        pytest.skip("the uid mode needs root")
    monkeypatch.setenv("SPOGW_SANDBOX_ISOLATION", "uid")
    monkeypatch.setattr(sandbox, "_MODE", None)
    monkeypatch.setattr(sandbox, "ISOLATION", "unprobed")
    assert sandbox.isolation().startswith("fresh uid")
    mark = "spogwmark" + secrets.token_hex(6)
    canary = CANARY_DIR / f"spogw-canary-{secrets.token_hex(6)}"
    canary.write_text("canary")  # 0644: the fresh uid may not write it
    try:
        leave = (f"import subprocess, sys, os\ndef solve(p):\n    out = []\n"
                 f"    for f in (lambda: subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{mark}']),\n"
                 f"              lambda: __import__('socket').create_connection(('127.0.0.1', 9)),\n"
                 f"              lambda: open('{canary}', 'w'), lambda: os.kill(1, 9)):\n"
                 f"        try:\n            f()\n            out.append('did')\n"
                 f"        except Exception as e:\n            out.append(type(e).__name__)\n    return ' '.join(out)\n")
        r = operators.run_workflow(leave, "p", timeout=2)
        assert r["answer"] == "PermissionError PermissionError PermissionError PermissionError", r
        r = operators.run_workflow("def solve(p):\n    while True:\n        pass\n", "p", timeout=1)
        assert r["error"].startswith(("timeout", "killed")), r
        assert sandbox.run_program("print(6 * 7)")["stdout"] == "42\n"
        assert canary.read_text() == "canary" and _procs_with(mark) == []
    finally:
        canary.unlink(missing_ok=True)
        for pid in _procs_with(mark):
            os.kill(pid, signal.SIGKILL)


def test_run_program():
    r = sandbox.run_program("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 39")
    assert r == dict(ok=True, stdout="42\n", stderr="", error=None, seconds=r["seconds"])
    r = sandbox.run_program("def f():\n    1 / 0\nf()")
    assert not r["ok"] and r["error"] == "exit 1: ZeroDivisionError: division by zero"
    assert "<program>" in r["stderr"] and "main" not in r["stderr"]  # no runtime frames
    r = sandbox.run_program("while True: pass", timeout=1)
    assert not r["ok"] and r["error"].startswith("timeout")
    r = sandbox.run_program("print('z' * 200000)")
    assert r["ok"] and r["stdout"].startswith("zzz") and r["stdout"].endswith(sandbox.MARK)
    assert len(r["stdout"]) == sandbox.CAP + len(sandbox.MARK)


SCI = """import os, numpy, sympy
x = sympy.Symbol('x')
print(sympy.solve(x**3 - 6*x**2 + 11*x - 6, x), numpy.linalg.solve([[2.0, 1.0], [1.0, 3.0]], [3.0, 5.0]).round(9).tolist())
print(len(os.listdir('/proc/self/task')))  # OpenBLAS starts a thread per core unless told not to
"""


def _sci_reference():
    """What SCI prints when run right here, with the parent's own packages, in one thread."""
    import numpy
    import sympy

    x = sympy.Symbol("x")
    return (f"{sympy.solve(x**3 - 6*x**2 + 11*x - 6, x)} "
            f"{numpy.linalg.solve([[2.0, 1.0], [1.0, 3.0]], [3.0, 5.0]).round(9).tolist()}\n1\n")


@pytest.mark.parametrize("mem_mb", [512, 256])  # run_program's default, and what programmer passes
def test_run_program_imports_numpy_and_sympy(mem_mb):
    r = sandbox.run_program(SCI, timeout=60, mem_mb=mem_mb)
    assert r["ok"] and r["stdout"] == _sci_reference(), r
    assert "read-only packages: numpy sympy mpmath" in sandbox.isolation()


class _ProgramExecutor:
    """An executor whose every reply is the SCI program."""

    def chat(self, messages, temperature=0.0, max_tokens=512, sample_index=0):
        return f"```python\n{SCI}```", {"prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.0}


def test_programmer_imports_numpy_and_sympy(monkeypatch):
    import operators

    monkeypatch.setattr(operators, "PROGRAM_TIMEOUT", 60.0)  # a loaded test machine, not a timed test
    r = operators.run_workflow("def solve(p):\n    return programmer(p)\n", "Roots of x^3 - 6x^2 + 11x - 6?",
                             executor=_ProgramExecutor(), timeout=10)
    assert r["error"] is None and r["answer"] == _sci_reference().strip() and r["calls"] == 1, r


INIT = "import os\nLIBS = os.listdir(os.path.join(os.path.dirname(__file__), '..', '{}.libs'))\n"
PKG_PROBE = """import importlib, os
for name in {names}:
    try:
        m = importlib.import_module(name)
    except ImportError as e:
        print(name, type(e).__name__)
        continue
    out = [name, str(m.LIBS)]
    for f in (lambda: open(m.__file__, 'a'), lambda: os.mkdir(os.path.dirname(m.__file__) + '/x'),
              lambda: open(os.path.join(os.path.dirname(m.__file__), '..', 'x.py'), 'w')):
        try:
            f()
            out.append('changed')
        except OSError:
            out.append('refused')
    print(' '.join(out))
"""


@pytest.mark.parametrize("mode", ["ns", "uid"])
def test_packages_exposed_read_only_in_each_mode(monkeypatch, mode):
    """Test packages, each with a wheel's `.libs` sibling: one that any uid may read is importable
    in both root modes, read-only; one with a world-writable file is left out; one under a 0700
    directory (like /root here) is importable through the ns mode's bind mount only."""
    if os.geteuid() != 0:
        pytest.skip("the ns and uid modes need root")
    tag = secrets.token_hex(4)
    good, bad, hid = f"spogwpkg_{tag}", f"spogwbad_{tag}", f"spogwhid_{tag}"
    base = Path(tempfile.mkdtemp(dir=CANARY_DIR))  # reachable by any uid, unlike pytest's tmp_path
    try:
        base.chmod(0o755)
        (base / "hidden").mkdir(0o700)
        for name, where in ((good, base), (bad, base), (hid, base / "hidden")):
            (where / name).mkdir()
            (where / name / "__init__.py").write_text(INIT.format(name))
            (where / f"{name}.libs").mkdir()
            (where / f"{name}.libs" / "libx.so").write_text("not really")
        (base / bad / "__init__.py").chmod(0o666)
        monkeypatch.syspath_prepend(str(base))
        monkeypatch.syspath_prepend(str(base / "hidden"))
        monkeypatch.setenv("SPOGW_SANDBOX_ISOLATION", mode)
        monkeypatch.setattr(sandbox, "PACKAGES", (good, bad, hid))
        for k, v in (("_MODE", None), ("ISOLATION", "unprobed"), ("_SITE", (None, []))):
            monkeypatch.setattr(sandbox, k, v)
        iso = sandbox.isolation()
        shown = f"{good} {hid}" if mode == "ns" else good
        assert f"read-only packages: {shown} [" in iso, iso
        assert f"{bad} left out: {base / bad / '__init__.py'} is world-writable" in iso, iso
        assert (f"{hid} not readable by the sandbox uid" in iso) == (mode == "uid"), iso
        r = sandbox.run_program(PKG_PROBE.format(names=(good, hid, bad)), timeout=30)
        reachable = "['libx.so'] refused refused refused"
        assert r["ok"] and r["stdout"].splitlines() == [
            f"{good} {reachable}", f"{hid} {reachable}" if mode == "ns" else f"{hid} ModuleNotFoundError",
            f"{bad} ModuleNotFoundError"], r
        assert sorted(os.listdir(base)) == sorted([good, bad, f"{good}.libs", f"{bad}.libs", "hidden"])
        assert [(base / n / "__init__.py").read_text() for n in (good, bad)] == [INIT.format(good), INIT.format(bad)]
    finally:
        shutil.rmtree(base)


def test_run_many_yields_all_with_indices():
    jobs = [operators.job(f"def solve(p):\n    return p * {i}\n", "ab", timeout=5) for i in range(6)]
    jobs.append(dict(program="print('prog')"))
    seen = []
    out = dict(sandbox.run_many(jobs, workers=2, progress=lambda done, total: seen.append((done, total))))
    assert sorted(out) == list(range(7))
    assert [out[i]["answer"] for i in range(6)] == ["ab" * i for i in range(6)]
    assert out[6]["stdout"] == "prog\n" and seen[-1] == (7, 7)


def _cli(script, *args, **kw):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, **kw)


def test_cli(tmp_path):
    wf = tmp_path / "wf.py"
    wf.write_text("def solve(p):\n    print('{\"answer\": \"forged\"}')\n    return p.upper()\n")
    p = _cli("operators.py", str(wf), "--problem", "hi there", "--executor", "none", "--timeout", "5")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1, p
    r = json.loads(p.stdout)
    assert list(r) == list(operators.RESULT_KEYS) and r["answer"] == "HI THERE" and r["error"] is None
    wf.write_text("def solve(p):\n    raise KeyError(p)\n")
    r = json.loads(_cli("operators.py", str(wf), "--problem", "k").stdout)
    assert r["error"] == "exception: KeyError: 'k'"
    assert _cli("operators.py", str(tmp_path / "missing.py"), "--problem", "x").returncode == 2
    assert _cli("operators.py", str(wf)).returncode == 2  # no --problem
    assert _cli("operators.py", str(wf), "--problem", "x", "--timeout", "-1").returncode == 2
    assert _cli("operators.py", str(wf), "--problem", "x", "--executor", "ftp://nope").returncode == 2
    info = json.loads(_cli("sandbox.py", "--info").stdout)
    assert info["isolation"] == sandbox.isolation()
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nprint(sys.stdin.read().upper())\n")
    r = json.loads(_cli("sandbox.py", str(prog), "--stdin", "hey").stdout)
    assert r["ok"] and r["stdout"] == "HEY\n"
    assert _cli("sandbox.py", str(tmp_path / "missing.py")).returncode == 2
    assert _cli("sandbox.py").returncode == 2  # neither a program nor --info


def test_bench_sandbox_smoke():
    p = subprocess.run([sys.executable, "bench.py", "sandbox", "--n", "2", "--n-import", "1", "--rounds", "1", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["program_numpy_sympy"]["runs"] == out["bare_numpy_sympy"]["runs"] == 1
    assert out["program_plain"]["runs"] == out["program_plain_no_packages"]["runs"] == 2
    assert 0 < out["numpy_sympy_vmpeak_mb"] < 256 and out["plain_with_vs_without_packages"] > 0
    bad = subprocess.run([sys.executable, "bench.py", "sandbox", "--n", "0"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--n" in bad.stderr


def test_packages_under_tmp_are_importable(monkeypatch):
    """A venv under /tmp (CI's, a newcomer's mktemp) holds the packages in the very directory the
    sandbox covers with its own tmpfs: they must still be bound in (through a descriptor opened
    before the tmpfs is mounted), not appear as empty namespace packages."""
    if os.geteuid() != 0:
        pytest.skip("the ns mode needs root")
    name = f"spogwtmp_{secrets.token_hex(4)}"
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        (base / name).mkdir()
        (base / name / "__init__.py").write_text("VALUE = 42\n")
        monkeypatch.syspath_prepend(str(base))
        monkeypatch.setenv("SPOGW_SANDBOX_ISOLATION", "ns")
        monkeypatch.setattr(sandbox, "PACKAGES", (name,))
        for k, v in (("_MODE", None), ("ISOLATION", "unprobed"), ("_SITE", (None, []))):
            monkeypatch.setattr(sandbox, k, v)
        assert f"read-only packages: {name}" in sandbox.isolation()
        r = sandbox.run_program(f"import {name}\nprint({name}.VALUE)", timeout=30)
        assert r["error"] is None and r["stdout"].strip() == "42", r
    finally:
        shutil.rmtree(base, ignore_errors=True)
