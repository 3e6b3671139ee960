"""Run untrusted Python (workflows, executor-written programs, unit tests) in a killable,
resource-limited subprocess, and pass the workflow's stub calls to a handler in the parent (ARCHITECTURE §4).

    python sandbox.py --info                                   # which isolation is in force
    python sandbox.py prog.py --timeout 5                      # a program as __main__: {ok, stdout, ...}
    python operators.py wf.py --problem "What is 47 * 6?" --executor local     # a workflow, with operators

Every run is a fresh `python -I -S` child in its own session. As root (the normal case here) it
lives in new network, PID and mount namespaces: no interfaces, only its own processes under a
fresh /proc, every mount read-only + nosuid but a size-capped tmpfs on /tmp, its working dir, and it
drops to a fresh unprivileged uid before running anything untrusted. When its PID 1 exits the
kernel kills everything left in the namespace, so nothing outlives a run. Besides the stdlib it
can import PACKAGES (numpy, sympy, mpmath), read-only; nothing else of site-packages is visible.
The child talks to the parent only through a private pipe pair (JSON lines); the API key and the
executor client never leave the parent. This file knows nothing of operators: run_workflow takes
the stub names and the handler that answers them. See `isolation()` for what is in force where namespaces
are not allowed.
"""
import argparse
import atexit
import contextlib
import ctypes
import importlib.util
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

CAP = 64 * 1024  # bytes kept of stdout / stderr / answer / operator output
MARK = "\n...[truncated]"
MAX_MSG = 4 * 1024 * 1024  # one JSON line from the child; longer is a protocol error
# Installed packages that sandboxed code may import (executor-written MATH programs reach for sympy
# and numpy all the time; mpmath is sympy's one dependency). Only these directories, plus a wheel's
# bundled `<name>.libs` (numpy's OpenBLAS), become visible and only read-only: torch, openai and the
# rest of site-packages stay out of reach. See _site().
PACKAGES = ("numpy", "sympy", "mpmath")
SITE_DIR = "/tmp/.site"  # where they appear inside the child's mount namespace

# The child runtime is sandbox_child.py, run from source (never imported here or there).
CHILD = (Path(__file__).resolve().parent / "sandbox_child.py").read_text(encoding="utf-8")


class SandboxError(RuntimeError):
    """The sandbox itself cannot start (never for anything the sandboxed code does); never a score."""


# ---- isolation: probed once per process --------------------------------------------------------

ISOLATION = "unprobed"  # set by isolation(); the bench and `--info` print it
_MODE = None  # (name, argv prefix, python, uid_drop, mounts, block_net)
_SITE = (None, [])  # (the child's sys.path entry for PACKAGES, [(name, host dir)]); set by _probe
_PROBE_LOCK = threading.Lock()
# Set while a step is being stopped (Ctrl-C, SIGTERM, a failed consumer): every running sandbox is
# killed within one poll (0.25 s) and none starts, so a stop does not wait out workflow timeouts.
_STOP = threading.Event()
_FAILED = threading.local()  # .error: the SandboxError this thread raised last (see run_workflow)
_DESCRIBE = {
    "ns": "netns+pidns+mountns (ro mounts, tmpfs /tmp) + fresh uid + rlimits",
    "userns": "userns+netns+pidns+mountns (ro mounts, tmpfs /tmp) + rlimits; no uid drop (not root)",
    "uid": "fresh uid + rlimits + socket/exec audit hook (no namespaces: network blocked only at Python's socket layer)",
    "none": "rlimits + socket/exec audit hook only (no namespaces, not root): weak isolation",
}
_NS_FLAGS = ["--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]


def _pythons():
    """Interpreters to try for the child: ours first; a fresh uid may not be able to reach ours
    (e.g. under a 0700 /root), then a system one (the runtime is stdlib-only)."""
    seen, out = set(), []
    for p in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if p not in seen and os.path.isfile(p) and os.access(p, os.X_OK):
            seen.add(p)
            out.append(p)
    return out


def _set_non_dumpable():
    # our environment holds the API key: make /proc/<us>/environ and ptrace root-only
    try:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    except Exception:
        pass


def _other_writable(path):
    """The first file or directory at or above `path`, or anywhere below it, that a uid with only
    "other" permissions may write (a fresh uid has no groups), else None. A sticky ancestor such as
    /tmp is fine: others cannot rename or remove what they do not own there."""
    up = path
    while True:
        if os.lstat(up).st_mode & 0o1002 == 0o002:
            return up
        if up == os.path.dirname(up):
            break
        up = os.path.dirname(up)
    for top, dirs, files in os.walk(path):
        for n in dirs + files:
            if os.lstat(os.path.join(top, n)).st_mode & 0o002:
                return os.path.join(top, n)
    return None


def _site(mode):
    """Make PACKAGES importable, read-only, for the child of `mode`: (sys.path entry, [(name, host
    dir)], notes). The dirs are the ones the parent itself would import (found, not imported). ns
    and userns: read-only bind mounts under SITE_DIR (the runtime mounts them). uid: a root-owned
    dir of symlinks; without a mount namespace the fresh uid reads whatever "other" may read anyway,
    so this adds only the sys.path entry. Both: a package some other uid could write is left out.
    none: nothing, since the child is our own uid and could rewrite the files."""
    if mode == "none" or not PACKAGES:
        return None, [], ["no packages: the child runs as our uid"] if PACKAGES else []
    dirs, notes = [], []
    for name in PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            notes.append(f"{name} not installed as a package")
            continue
        d = os.path.realpath(list(spec.submodule_search_locations)[0])
        pkg = [(name, d)] + ([(name + ".libs", d + ".libs")] if os.path.isdir(d + ".libs") else [])
        bad = next(filter(None, (_other_writable(p) for _, p in pkg)), None)
        if bad:
            notes.append(f"{name} left out: {bad} is world-writable")
            continue
        dirs += pkg
    if not dirs or mode in ("ns", "userns"):
        return (SITE_DIR if dirs else None), dirs, notes
    links = tempfile.mkdtemp(prefix="spogw-site-")
    os.chmod(links, 0o755)
    atexit.register(shutil.rmtree, links, True)
    for name, d in dirs:
        os.symlink(d, os.path.join(links, name))
    return links, dirs, notes


def isolation():
    """Probe (once) the strongest isolation this machine allows by running a real child with it;
    returns the ISOLATION string. SPOGW_SANDBOX_ISOLATION=ns|userns|uid|none forces a mode."""
    if _MODE is not None and ISOLATION != "unprobed":
        return ISOLATION
    with _PROBE_LOCK:  # callers' threads may race here; _MODE is provisional while probing
        return _probe()


_PROBE = '''def solve(p):
    import fractions, sys, importlib.util as u
    def found(name):
        try:
            return u.find_spec(name) is not None
        except Exception:  # e.g. PermissionError: not there for this uid
            return False
    return ' '.join(['ok', sys.implementation.cache_tag] + [n for n in p.split() if found(n)])
'''


def _probe():
    global ISOLATION, _MODE, _SITE
    if _MODE is not None and ISOLATION != "unprobed":
        return ISOLATION  # another thread finished the probe while we waited
    _set_non_dumpable()
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    root = os.geteuid() == 0
    modes = []
    if unshare and root:
        modes.append(("ns", [unshare] + _NS_FLAGS, True, True, False))
    if unshare:
        modes.append(("userns", [unshare, "--user", "--map-root-user"] + _NS_FLAGS, False, True, False))
    if root:
        modes.append(("uid", [], True, False, True))
    modes.append(("none", [], False, False, True))
    forced = os.environ.get("SPOGW_SANDBOX_ISOLATION")
    if forced:
        modes = [m for m in modes if m[0] == forced]
        if not modes:
            raise SandboxError(f"SPOGW_SANDBOX_ISOLATION={forced!r} is not available here")
    for name, prefix, uid_drop, mounts, block_net in modes:
        site = None
        for py in _pythons() if uid_drop else _pythons()[:1]:
            _MODE = (name, prefix, py, uid_drop, mounts, block_net)
            if site is None:
                site = _site(name)
            _SITE = site[:2]
            # the import proves the dropped uid can still read the interpreter's stdlib; find_spec
            # that it reaches the packages (without paying for their import)
            r = _spawn("workflow", _PROBE, " ".join(n for n, _ in _SITE[1] if n in PACKAGES), [], None, 5.0, 256)
            words = ((r["final"] or {}).get("answer") or "").split()
            if words[:1] == ["ok"]:
                notes = (r["final"].get("notes") or []) + site[2]
                tag = words[1] if len(words) > 1 else "?"
                if tag != sys.implementation.cache_tag and _SITE[1]:
                    # compiled modules and .pyc files are built for our interpreter only
                    notes.append(f"no packages: child python is {tag}, ours {sys.implementation.cache_tag}")
                    _SITE, words = (None, []), words[:2]
                missing = [n for n, _ in _SITE[1] if n in PACKAGES and n not in words[2:]]
                if missing:  # e.g. the uid mode, where the packages live under a 0700 home
                    notes.append(f"{' '.join(missing)} not readable by the sandbox uid")
                pk = f" + read-only packages: {' '.join(words[2:])}" if words[2:] else ""
                ISOLATION = _DESCRIBE[name] + pk + (f" [{'; '.join(notes)}]" if notes else "")
                return ISOLATION
    _MODE, _SITE = None, (None, [])
    raise SandboxError("no sandbox mode works here (cannot start a python child)")


# ---- one child process: spawn, broker, time-limit, kill ------------------------------------------

def _env(home):
    # an allowlist, not a blocklist: nothing like *KEY*/*TOKEN*/*SECRET*/*_PROXY can slip through
    env = {k: v for k, v in os.environ.items() if k in ("LANG", "TZ") or k.startswith("LC_")}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME=home, TMPDIR=home, PYTHONIOENCODING="utf-8")
    # numpy's OpenBLAS starts a thread per core at import, each ~40 MB of address space (buffer +
    # stack): on 16 cores that alone would overrun programmer's 256 MB RLIMIT_AS
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.setdefault("LANG", "C.UTF-8")
    return env


def clip(s):
    """At most CAP characters of s, marked where cut: what the parent keeps of any child output."""
    return s if len(s) <= CAP else s[:CAP] + MARK


def _alive(pid):
    """True while the child has not exited (without reaping it, so its pgid stays ours to kill)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def _kill_uid(uid):
    """Without a PID namespace a process can setsid() out of our group; with a fresh uid per run
    we can still find everything it started."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    if any(l.startswith("Uid:") and l.split()[1] == str(uid) for l in f):
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, IndexError):
                pass


def _spawn(mode, code, problem, ops, handler, timeout, mem_mb, stdin=None, keep_stdout=False):
    """Run one child. `handler(msg) -> reply dict` serves operator calls; time spent inside it is
    not charged to the child's `timeout` (the executor has its own timeouts and the call budget
    bounds how many). Returns {final, stdout, stderr, rc, timed_out, protocol, seconds}. However it
    ends (a KeyboardInterrupt or a handler's exception mid-loop too), the child's group is killed and
    reaped, and our pipe ends and its temp dir are gone."""
    if _STOP.is_set():
        raise Stopped("the step is stopping: no new sandbox")
    name, prefix, py, uid_drop, mounts, block_net = _MODE
    t0 = time.monotonic()
    uid = random.SystemRandom().randrange(1 << 28) + (1 << 30) if uid_drop else None
    host_dir = proc = None
    sel = selectors.DefaultSelector()
    try:
        if mounts:
            workdir = "/tmp/w"  # in the child's own tmpfs
        else:
            host_dir = workdir = tempfile.mkdtemp(prefix="spogw-sbx-")
            if uid is not None:
                os.chown(host_dir, uid, uid)
        cfg = dict(mode=mode, code=code, problem=problem, ops=list(ops), stdin=stdin, uid=uid, mounts=mounts,
                   block_net=block_net, workdir=workdir, cap=CAP, site_dir=_SITE[0], site=_SITE[1],
                   mem=int(mem_mb) << 20, cpu=int(timeout) + 1, fsize=16 << 20, nofile=64, nproc=64,
                   tmpfs_kb=64 * 1024)
        proc, to_child, from_child = _start(prefix + [py], cfg, keep_stdout)
        final, protocol, timed_out, heads, sizes = _broker(sel, proc, to_child, from_child, cfg, handler, t0, timeout)
    finally:
        if proc is not None:
            # kill the whole group before reaping, so the pgid cannot have been reused by then
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if uid is not None and not mounts:
                _kill_uid(uid)
            rc = proc.wait()
            for f in filter(None, (proc.stdout, proc.stderr)):
                f.close()
            os.close(from_child)
            os.close(to_child)
        sel.close()
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)
    def text(k):
        s = bytes(heads[k][:CAP]).decode("utf-8", "replace")
        return s + MARK if sizes[k] > CAP else s
    return dict(final=final, stdout=text("out"), stderr=text("err"), rc=rc, timed_out=timed_out,
                protocol=protocol, seconds=time.monotonic() - t0)


def _start(argv, cfg, keep_stdout):
    """Start the child `argv + [-I -S -c CHILD, its two pipe ends]` in its own session: (proc, our
    write end to it, our read end from it). A child that cannot start raises SandboxError (kept in
    _FAILED: run_workflow's handler may be the one starting it); no pipe end is left open."""
    c_in_r, c_in_w = os.pipe()  # parent -> child
    c_out_r, c_out_w = os.pipe()  # child -> parent
    try:
        proc = subprocess.Popen(
            argv + ["-I", "-S", "-c", CHILD, str(c_in_r), str(c_out_w)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE, pass_fds=(c_in_r, c_out_w), start_new_session=True,
            env=_env(cfg["workdir"]), cwd="/" if cfg["mounts"] else cfg["workdir"])
    except BaseException as e:  # an OSError, or a KeyboardInterrupt while it forks
        for fd in (c_in_r, c_in_w, c_out_r, c_out_w):
            os.close(fd)
        if not isinstance(e, OSError):
            raise
        _FAILED.error = SandboxError(f"cannot start the sandbox child: {e}")
        raise _FAILED.error from e
    os.close(c_in_r)
    os.close(c_out_w)
    return proc, c_in_w, c_out_r


def _broker(sel, proc, to_child, from_child, cfg, handler, t0, timeout):
    """Send the child `cfg`, answer its operator calls, keep its result and the head of its stdout /
    stderr, until its pipes close, the deadline (time in `handler` extends it), a protocol error or
    a stop: (final, protocol, timed_out, heads, sizes). One select loop, so no pipe can block us."""
    os.set_blocking(to_child, False)
    pending = bytearray(json.dumps(cfg).encode() + b"\n")
    sel.register(from_child, selectors.EVENT_READ, "ctl")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    if proc.stdout is not None:  # kept for programs only
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(to_child, selectors.EVENT_WRITE, "in")
    heads = {"ctl": bytearray(), "out": bytearray(), "err": bytearray()}
    sizes = {"out": 0, "err": 0}
    final, protocol, timed_out, exited = None, None, False, False
    deadline = t0 + timeout
    last_check = t0
    readers = 3 if proc.stdout is not None else 2
    while readers and not protocol and not _STOP.is_set():
        now = time.monotonic()
        if now >= deadline:
            timed_out = not exited
            break
        events = sel.select(min(deadline - now, 0.25))
        for key, _ in events:
            if key.data == "in":
                _write_some(key.fd, pending)
                if not pending:
                    sel.unregister(key.fd)
                continue
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                readers -= 1
                continue
            if key.data != "ctl":
                _keep_head(heads, sizes, key.data, data)
                continue
            if final is not None:
                continue  # anything after the result is noise; do not buffer it
            heads["ctl"] += data
            while final is None and not protocol:
                msg, protocol = _take_message(heads["ctl"])
                if msg is None:
                    break
                if "op" in msg and handler is not None:
                    t_op = time.monotonic()
                    reply = handler(msg)
                    deadline += time.monotonic() - t_op
                    if not pending:
                        sel.register(to_child, selectors.EVENT_WRITE, "in")
                    pending += json.dumps(reply).encode() + b"\n"
                else:
                    final = msg
        if not exited and (not events or time.monotonic() - last_check > 0.25):
            last_check = time.monotonic()
            if not _alive(proc.pid):  # exited, but something it started still holds our pipes
                exited = True
                deadline = min(deadline, last_check + 0.2)
    return final, protocol, timed_out, heads, sizes


def _keep_head(heads, sizes, stream, data):
    """Count `data` and keep it while the stream's head is short of CAP + 1 bytes: the rest is
    drained and dropped, so a flood of output costs no memory."""
    sizes[stream] += len(data)
    room = CAP + 1 - len(heads[stream])
    if room > 0:
        heads[stream] += data[:room]


def _write_some(fd, pending):
    """Write what the non-blocking pipe takes of `pending` and drop it from there; all of it is
    dropped when the child is gone or closed its end."""
    try:
        del pending[:os.write(fd, pending[:65536])]
    except BlockingIOError:
        pass
    except OSError:
        pending.clear()


def _take_message(buf):
    """Take the first complete line of `buf` off it as a JSON object: (msg, None); (None, None)
    while no line is complete; (None, reason) for a protocol error."""
    nl = buf.find(b"\n")
    if nl < 0:
        return None, ("message over 4 MB" if len(buf) > MAX_MSG else None)
    line = bytes(buf[:nl])
    del buf[:nl + 1]
    try:
        msg = json.loads(line)
        assert isinstance(msg, dict)
    except Exception:
        return None, "malformed message from the child"
    return msg, None


def _death(rc, stderr):
    """A reason string for a child that ended without a result."""
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        if sig == "SIGKILL":
            return "killed: SIGKILL (memory, process or CPU limit)"
        if sig == "SIGXCPU":
            return "killed: CPU time limit"
        return f"crash: killed by {sig}"
    tail = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
    return f"crash: exited with status {rc} without a result" + (f" ({tail})" if tail else "")


# ---- public API ---------------------------------------------------------------------------------

def run_workflow(code, problem, names, handler, *, timeout=60.0, mem_mb=1024):
    """Run `solve(problem)` from `code` in a fresh sandbox. The child holds one stub per name in
    `names`; a stub's call reaches `handler(msg) -> reply` here in the parent ({"op", "args",
    "kwargs"} -> {"ok": str} or {"error": str}; operators.run_workflow serves the operator library).
    Never raises for anything the workflow does: {answer, error, seconds}. `timeout` is the child's
    own wall time (time inside the handler does not count). A sandbox the handler starts itself
    (programmer, test) that cannot start raises SandboxError here, not an operator error (a score)."""
    isolation()
    _FAILED.error = None
    r = _spawn("workflow", code, str(problem), list(names), handler, timeout, mem_mb)
    if _FAILED.error is not None:  # a sandbox the handler started could not start (see _FAILED)
        raise SandboxError(f"{_FAILED.error} (while serving a workflow's operator call)")
    answer, error = None, None
    fin = r["final"]
    if fin is not None:
        a = fin.get("answer")
        answer = clip(a) if isinstance(a, str) else None
        error = fin.get("error") if isinstance(fin.get("error"), str) else None
        if answer is None and error is None:
            error = "bad output: no answer"
    elif r["protocol"]:
        error = "protocol: " + r["protocol"]
    elif r["timed_out"]:
        error = f"timeout: no result after {timeout:g} s"
    else:
        error = _death(r["rc"], r["stderr"])
    return dict(answer=answer, error=error, seconds=round(r["seconds"], 4))


def run_program(code, *, stdin=None, timeout=10.0, mem_mb=512):
    """Run a standalone program (executor-written code, unit tests) as __main__ in a fresh
    sandbox: {ok, stdout, stderr, error, seconds}; ok means exit status 0 within the time."""
    isolation()
    r = _spawn("program", code, "", [], None, timeout, mem_mb, stdin=stdin, keep_stdout=True)
    if r["timed_out"]:
        error = f"timeout: no exit after {timeout:g} s"
    elif r["rc"] > 0:
        tail = r["stderr"].strip().splitlines()[-1][:300] if r["stderr"].strip() else ""
        error = f"exit {r['rc']}" + (f": {tail}" if tail else "")
    elif r["rc"] < 0:
        error = _death(r["rc"], r["stderr"])
    else:
        error = None
    return dict(ok=error is None, stdout=r["stdout"], stderr=r["stderr"], error=error,
                seconds=round(r["seconds"], 4))


def run_many(jobs, workers=2, progress=None):
    """Run many sandboxes concurrently; yields (index, result) as each finishes. A job is a
    zero-argument callable (e.g. functools.partial(operators.run_workflow, code, problem, ...)) or
    {"program": code, ...}: run_program's arguments. `progress`: a tqdm-like object (.update(1)) or a
    callable(done, total). Closing the generator early cancels the jobs not yet started."""
    jobs = list(jobs)
    isolation()  # probe once, before the threads race to do it

    def one(job):
        if callable(job):
            return job()
        job = dict(job)
        return run_program(job.pop("program"), **job)

    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)))
    try:
        futs = {pool.submit(one, job): i for i, job in enumerate(jobs)}
        for done, fut in enumerate(as_completed(futs), 1):
            if _STOP.is_set():  # a result now may be a sandbox the stop killed: never hand it out
                raise Stopped("the step was stopped")
            if progress is not None:
                progress.update(1) if hasattr(progress, "update") else progress(done, len(jobs))
            yield futs[fut], fut.result()
    except BaseException:
        # the consumer failed or was stopped (a tripped executor, Ctrl-C, SIGTERM): the sandboxes
        # still running are not wanted, so end them now instead of waiting out their timeouts
        with stopping():
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class Stopped(Exception):
    """A sandbox asked to start, or run_many to hand out a result, while a step is stopping."""


@contextlib.contextmanager
def stopping():
    """Within: every running sandbox is killed within one poll (0.25 s) and none starts, so the
    unwinding of a stopped step never waits out workflow timeouts; cleared on leaving, so the
    process can run sandboxes again."""
    _STOP.set()
    try:
        yield
    finally:
        _STOP.clear()


# ---- CLI ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("program", nargs="?", help="a Python file to run as __main__ in the sandbox")
    ap.add_argument("--stdin", default=None, help="text given to the program on stdin")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--mem-mb", type=int, default=512)
    ap.add_argument("--info", action="store_true", help="print the isolation in force and exit")
    args = ap.parse_args(argv)
    if args.info:
        print(json.dumps({"isolation": isolation(), "mode": _MODE[0], "python": _MODE[2]}))
        return 0
    if args.program is None:
        ap.error("PROGRAM is required (or --info)")
    if args.timeout <= 0 or args.mem_mb < 64:
        ap.error("--timeout must be > 0 and --mem-mb >= 64")
    try:
        with open(args.program, encoding="utf-8") as f:
            code = f.read()
    except (OSError, UnicodeDecodeError) as e:
        ap.error(f"cannot read program file {args.program}: {e}")
    print(json.dumps(run_program(code, stdin=args.stdin, timeout=args.timeout, mem_mb=args.mem_mb)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SandboxError as e:  # exit 2 with config.cli's wording, without importing the stack above it
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
