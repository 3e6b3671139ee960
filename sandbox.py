"""Run untrusted Python (workflows, executor-written programs, unit tests) in a killable,
resource-limited subprocess, and broker the workflow's operator calls to the parent (ARCHITECTURE §4).

    python sandbox.py --info                                   # which isolation is in force
    python sandbox.py wf.py --problem "What is 47 * 6?" --executor none
    python sandbox.py wf.py --problem "What is 47 * 6?" --executor local
    python sandbox.py wf.py --problem "2+2?" --executor http://127.0.0.1:8000/v1 --model NAME

Every run is a fresh `python -I -S` child in its own session. As root (the normal case here) it
lives in new network, PID and mount namespaces: no interfaces, only its own processes under a
fresh /proc, / remounted read-only + nosuid, a size-capped tmpfs on /tmp as its working dir, and it
drops to a fresh unprivileged uid before running anything untrusted. When its PID 1 exits the
kernel kills everything left in the namespace, so nothing outlives a run. Besides the stdlib it
can import PACKAGES (numpy, sympy, mpmath), read-only; nothing else of site-packages is visible.
The child talks to the parent only through a private pipe pair (JSON lines); the API key and the
executor client never leave the parent. See `isolation()` for what is in force where namespaces
are not allowed.
"""
import argparse
import atexit
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

CAP = 64 * 1024  # bytes kept of stdout / stderr / answer / operator output
MARK = "\n...[truncated]"
MAX_MSG = 4 * 1024 * 1024  # one JSON line from the child; longer is a protocol error
RESULT_KEYS = ("answer", "error", "calls", "prompt_tokens", "completion_tokens", "cost_usd", "seconds", "infra_error")
# Installed packages that sandboxed code may import (executor-written MATH programs reach for sympy
# and numpy all the time; mpmath is sympy's one dependency). Only these directories, plus a wheel's
# bundled `<name>.libs` (numpy's OpenBLAS), become visible and only read-only: torch, openai and the
# rest of site-packages stay out of reach. See _site().
PACKAGES = ("numpy", "sympy", "mpmath")
SITE_DIR = "/tmp/.site"  # where they appear inside the child's mount namespace

# ---------------------------------------------------------------------------------------------
# The child runtime: stdlib only, runs under `python -I -S -c`, so it must stay compatible with
# any python3 >= 3.8 (as root we may run it on /usr/bin/python3, see _probe). It is trusted code
# until it calls exec(); after that the workflow shares its process, so nothing the runtime does
# after exec() is a security boundary: the parent trusts the child only for the answer text and
# counts calls / tokens / time itself.
# ---------------------------------------------------------------------------------------------
_CHILD = r'''
import os, sys, json, resource
def main():
    rf = os.fdopen(int(sys.argv[1]), "rb")
    wf = os.fdopen(int(sys.argv[2]), "wb", 0)
    cfg = json.loads(rf.readline())
    dumps, cap, notes = json.dumps, cfg["cap"], []
    def send(obj):
        wf.write(dumps(obj).encode() + b"\n")
    libc = None
    if cfg["mounts"] or cfg["uid"] is not None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    if cfg["mounts"]:
        # we are PID 1 of fresh namespaces, still (namespace-)root: give the run a private tmpfs
        # and make everything else read-only, before dropping privileges
        def mount(src, dst, fs, flags, data):
            if libc.mount(src, dst, fs, flags, data) != 0:
                notes.append("mount %s failed: errno %d" % (dst.decode(), ctypes.get_errno()))
                return False
            return True
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
        opts = ("size=%dk,mode=1777" % cfg["tmpfs_kb"]).encode()
        site = cfg["site_dir"]
        # hold each package dir open first: a venv under /tmp (a CI runner's, a newcomer's) is hidden
        # by the tmpfs below, and the bind then reads it through the descriptor instead of the path
        held = [(name, os.open(src, os.O_PATH | os.O_DIRECTORY)) for name, src in cfg["site"]] if site else []
        if mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts) and site:
            # the importable packages (see _site()): each dir a read-only bind in a tmpfs that is
            # itself remounted read-only, so neither a fresh uid nor a userns root (whose uid may own
            # the files) can change them, and `..` from a bind ends in this tmpfs, not site-packages
            os.mkdir(site, 0o755)
            if mount(b"tmpfs", site.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=755"):
                for name, fd in held:
                    dst = (site + "/" + name).encode()
                    os.mkdir(dst)
                    if mount(b"/proc/self/fd/%d" % fd, dst, None, MS_BIND, None) and not mount(
                            None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None):
                        libc.umount2(dst, 2)  # MNT_DETACH: never leave a writable bind behind
                mount(None, site.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        for _, fd in held:
            os.close(fd)
        if os.path.isdir("/dev/shm"):
            mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1024k,mode=1777")
        mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.makedirs(cfg["workdir"], 0o700, exist_ok=True)
    uid = cfg["uid"]
    if uid is not None and cfg["mounts"]:
        os.chown(cfg["workdir"], uid, uid)
    os.chdir(cfg["workdir"])
    R = resource
    lim = [(R.RLIMIT_CORE, 0), (R.RLIMIT_FSIZE, cfg["fsize"]), (R.RLIMIT_NOFILE, cfg["nofile"]),
           (R.RLIMIT_AS, cfg["mem"])]
    if uid is not None:  # NPROC counts per uid; our uid is fresh, so this is per run
        lim.append((R.RLIMIT_NPROC, cfg["nproc"]))
    for what, n in lim:
        try:
            R.setrlimit(what, (n, n))
        except (ValueError, OSError) as e:
            notes.append("rlimit %d: %s" % (what, e))
    R.setrlimit(R.RLIMIT_CPU, (cfg["cpu"], cfg["cpu"] + 1))
    if libc is not None:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot give root back
    if cfg["mounts"] and uid is None:
        # namespace root with no uid to drop to (userns mode): give up every capability, or the
        # workflow could simply remount / read-write. The bounding set first, so that exec'ing a
        # program as uid 0 cannot hand them back.
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
        class Hdr(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        empty = (ctypes.c_uint32 * 6)()
        if libc.capset(ctypes.byref(Hdr(0x20080522, 0)), empty) != 0:
            notes.append("capset failed: errno %d" % ctypes.get_errno())
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG=SIGKILL again: setuid() cleared it
    if cfg["block_net"]:
        # no network namespace: refuse sockets (and the usual ways around the hook) in Python
        def hook(event, args):
            if event == "socket.__new__" and args[1] != 1 or event in (
                    "ctypes.dlopen", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                    "os.spawn", "os.fork", "os.forkpty", "pty.spawn"):
                raise PermissionError("sandbox: %s blocked" % event)
        sys.addaudithook(hook)
    if cfg.get("stdin") is not None:
        fd = os.memfd_create("stdin") if hasattr(os, "memfd_create") else os.open(".stdin", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, cfg["stdin"].encode())
        os.lseek(fd, 0, 0)
        os.dup2(fd, 0)
        os.close(fd)
    if cfg["site_dir"]:
        sys.path.append(cfg["site_dir"])  # after the stdlib: a package cannot shadow a stdlib module
    import builtins
    code = cfg["code"]
    if cfg["mode"] == "program":
        sys.argv = ["program"]
        status = 0
        try:
            exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                sys.stderr.write(str(e.code) + "\n")
        except BaseException:
            import traceback
            et, ev, tb = sys.exc_info()
            traceback.print_exception(et, ev, tb.tb_next)  # the program's frames, not ours
            status = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(status & 255)
    import _thread
    lock = _thread.allocate_lock()

    class OperatorError(Exception):
        pass

    def stub(name):
        def op(*args, **kwargs):
            with lock:
                send({"op": name, "args": list(args), "kwargs": kwargs})
                line = rf.readline()
            if not line:
                raise OperatorError("broker closed")
            msg = json.loads(line)
            if "ok" in msg:
                return msg["ok"]
            raise OperatorError(msg.get("error", "operator failed"))
        op.__name__ = name
        return op

    def clip(s):
        return s if len(s) <= cap else s[:cap] + "\n...[truncated]"

    def describe(e):
        try:
            msg = clip("%s: %s" % (type(e).__name__, e))
        except BaseException:
            msg = type(e).__name__
        return msg[:2000]

    g = {"__name__": "workflow", "__builtins__": dict(builtins.__dict__), "OperatorError": OperatorError}
    for name in cfg["ops"]:
        g[name] = stub(name)
    out = {"notes": notes}
    try:
        exec(compile(code, "<workflow>", "exec"), g)
        solve = g.get("solve")
        if not callable(solve):
            out["error"] = "no solve()"
        else:
            ans = solve(cfg["problem"])
            if ans is None:
                out["error"] = "bad output: solve() returned None"
            else:
                out["answer"] = clip(ans if type(ans) is str else str(ans))
    except SyntaxError as e:
        out["error"] = "syntax: " + describe(e)
    except BaseException as e:  # SystemExit, KeyboardInterrupt and MemoryError included
        out["error"] = "exception: " + describe(e)
    send(out)
    os._exit(0)  # do not wait for threads the workflow left running
main()
'''


class SandboxError(RuntimeError):
    """The sandbox itself cannot start (never raised for anything the sandboxed code does)."""


# ---- isolation: probed once per process --------------------------------------------------------

ISOLATION = "unprobed"  # set by isolation(); the bench and `--info` print it
_MODE = None  # (name, argv prefix, python, uid_drop, mounts, block_net)
_SITE = (None, [])  # (the child's sys.path entry for PACKAGES, [(name, host dir)]); set by _probe
_PROBE_LOCK = threading.Lock()
_DESCRIBE = {
    "ns": "netns+pidns+mountns (ro root, tmpfs /tmp) + fresh uid + rlimits",
    "userns": "userns+netns+pidns+mountns (ro root, tmpfs /tmp) + rlimits; no uid drop (not root)",
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
        import ctypes
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


def _clip(s):
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
    bounds how many). Returns {final, stdout, stderr, rc, timed_out, protocol, seconds}."""
    name, prefix, py, uid_drop, mounts, block_net = _MODE
    t0 = time.monotonic()
    uid = random.SystemRandom().randrange(1 << 28) + (1 << 30) if uid_drop else None
    host_dir = None
    if mounts:
        workdir = "/tmp/w"
    else:
        host_dir = workdir = tempfile.mkdtemp(prefix="spogw-sbx-")
        if uid is not None:
            os.chown(host_dir, uid, uid)
    cfg = dict(mode=mode, code=code, problem=problem, ops=list(ops), stdin=stdin, uid=uid,
               mounts=mounts, block_net=block_net, workdir=workdir, cap=CAP, site_dir=_SITE[0], site=_SITE[1],
               mem=int(mem_mb) << 20, cpu=int(timeout) + 1, fsize=16 << 20, nofile=64, nproc=64,
               tmpfs_kb=64 * 1024)
    c_in_r, c_in_w = os.pipe()  # parent -> child
    c_out_r, c_out_w = os.pipe()  # child -> parent
    try:
        proc = subprocess.Popen(
            prefix + [py, "-I", "-S", "-c", _CHILD, str(c_in_r), str(c_out_w)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE, pass_fds=(c_in_r, c_out_w), start_new_session=True,
            env=_env(workdir), cwd="/" if mounts else workdir)
    except OSError as e:
        for fd in (c_in_r, c_in_w, c_out_r, c_out_w):
            os.close(fd)
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)
        raise SandboxError(f"cannot start the sandbox child: {e}") from e
    os.close(c_in_r)
    os.close(c_out_w)
    os.set_blocking(c_in_w, False)
    pending = bytearray(json.dumps(cfg).encode() + b"\n")
    sel = selectors.DefaultSelector()
    sel.register(c_out_r, selectors.EVENT_READ, "ctl")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    if keep_stdout:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(c_in_w, selectors.EVENT_WRITE, "in")
    bufs = {"ctl": bytearray(), "out": bytearray(), "err": bytearray()}
    sizes = {"out": 0, "err": 0}
    final, protocol, timed_out, exited = None, None, False, False
    deadline = t0 + timeout
    last_check = t0
    readers = 3 if keep_stdout else 2
    while readers and not protocol:
        now = time.monotonic()
        if now >= deadline:
            timed_out = not exited
            break
        events = sel.select(min(deadline - now, 0.25))
        for key, _ in events:
            if key.data == "in":
                try:
                    del pending[:os.write(key.fd, pending[:65536])]
                except BlockingIOError:
                    pass
                except OSError:  # the child is gone or closed its end
                    pending.clear()
                if not pending:
                    sel.unregister(key.fd)
                continue
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                readers -= 1
                continue
            if key.data != "ctl":  # keep the head, drain and drop the rest
                sizes[key.data] += len(data)
                room = CAP + 1 - len(bufs[key.data])
                if room > 0:
                    bufs[key.data] += data[:room]
                continue
            if final is not None:
                continue  # anything after the result is noise; do not buffer it
            buf = bufs["ctl"]
            buf += data
            while final is None and not protocol:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_MSG:
                        protocol = "message over 4 MB"
                    break
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                try:
                    msg = json.loads(line)
                    assert isinstance(msg, dict)
                except Exception:
                    protocol = "malformed message from the child"
                    break
                if "op" in msg and handler is not None:
                    t_op = time.monotonic()
                    reply = handler(msg)
                    deadline += time.monotonic() - t_op
                    if not pending:
                        sel.register(c_in_w, selectors.EVENT_WRITE, "in")
                    pending += json.dumps(reply).encode() + b"\n"
                else:
                    final = msg
        if not exited and (not events or time.monotonic() - last_check > 0.25):
            last_check = time.monotonic()
            if not _alive(proc.pid):  # exited, but something it started still holds our pipes
                exited = True
                deadline = min(deadline, last_check + 0.2)
    # kill the whole group before reaping, so the pgid cannot have been reused by then
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None and not mounts:
        _kill_uid(uid)
    rc = proc.wait()
    sel.close()
    for f in (proc.stdout, proc.stderr):
        if f:
            f.close()
    os.close(c_out_r)
    os.close(c_in_w)
    if host_dir:
        shutil.rmtree(host_dir, ignore_errors=True)
    def text(k):
        s = bytes(bufs[k][:CAP]).decode("utf-8", "replace")
        return s + MARK if sizes[k] > CAP else s
    return dict(final=final, stdout=text("out"), stderr=text("err"), rc=rc, timed_out=timed_out,
                protocol=protocol, seconds=time.monotonic() - t0)


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

def run_workflow(code, problem, *, executor=None, operators=None, context=None, timeout=60.0,
                 mem_mb=1024, max_calls=20, max_tokens_budget=None):
    """Run `solve(problem)` from `code` in a fresh sandbox; operators are stubs that call
    `operators[name](ctx, *args, **kwargs)` here in the parent. Never raises for anything the
    workflow does. `timeout` is the child's own wall time (operator calls do not count).
    `infra_error` is set (the first message) when an operator call met an InfraError: the result
    then says nothing about the workflow and must not be scored."""
    import operators as ops_mod  # lazy: operators imports us for run_program

    isolation()
    if operators is None:
        operators = ops_mod.OPERATORS
    ctx = ops_mod.OpContext(executor, context or {}, max_calls=max_calls, max_tokens_budget=max_tokens_budget)

    def handle(msg):
        name, args, kwargs = msg.get("op"), msg.get("args", []), msg.get("kwargs", {})
        fn = operators.get(name) if isinstance(name, str) else None
        if fn is None:
            return {"error": f"unknown operator {name!r}"}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return {"error": f"{name}: malformed call"}
        if ctx.infra_error:  # the run is void already: spend nothing more on it
            return {"error": f"{name}: executor unavailable"}
        # operator time is not charged to `timeout`, so operators that need no executor call
        # (a unanimous ensemble, test() on passing code) must be bounded too
        ctx.ops += 1
        if ctx.ops > ctx.max_calls:
            ctx.budget_error = ctx.budget_error or f"more than {ctx.max_calls} operator calls"
            return {"error": f"budget: more than {ctx.max_calls} operator calls"}
        try:
            out = fn(ctx, *args, **kwargs)
            return {"ok": _clip(out if isinstance(out, str) else str(out))}
        except ops_mod.BudgetError as e:
            ctx.budget_error = ctx.budget_error or str(e)
            return {"error": f"budget: {e}"}
        except ops_mod.InfraError as e:
            # the endpoint's fault, not the workflow's: reported beside the result whatever the
            # workflow then does with the exception (it may catch it and answer anyway)
            ctx.infra_error = ctx.infra_error or str(e)[:2000]
            return {"error": f"{name}: executor unavailable"}
        except TypeError as e:  # wrong arguments from the workflow
            return {"error": f"{name}: {e}"}
        except Exception as e:  # ExecutorError and anything else: the workflow sees an exception
            return {"error": f"{name}: {type(e).__name__}: {e}"[:2000]}

    r = _spawn("workflow", code, str(problem), list(operators), handle, timeout, mem_mb)
    answer, error = None, None
    fin = r["final"]
    if fin is not None:
        a = fin.get("answer")
        answer = _clip(a) if isinstance(a, str) else None
        error = fin.get("error") if isinstance(fin.get("error"), str) else None
        if answer is None and error is None:
            error = "bad output: no answer"
    elif r["protocol"]:
        error = "protocol: " + r["protocol"]
    elif r["timed_out"]:
        error = f"timeout: no result after {timeout:g} s"
    else:
        error = _death(r["rc"], r["stderr"])
    if ctx.budget_error:  # a caught budget error still marks the run
        error = "budget: " + ctx.budget_error
    return dict(answer=answer, error=error, calls=ctx.calls, prompt_tokens=ctx.prompt_tokens,
                completion_tokens=ctx.completion_tokens, cost_usd=round(ctx.cost_usd, 8),
                seconds=round(r["seconds"], 4), infra_error=ctx.infra_error)


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
    """Run many sandboxes concurrently; yields (index, result) as each finishes. A job is a dict
    of run_workflow keyword arguments (code, problem, ...), or {"program": code, ...} for
    run_program, or a zero-argument callable. `progress`: a tqdm-like object (.update(1)) or a
    callable(done, total). Closing the generator early cancels the jobs not yet started."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    jobs = list(jobs)
    isolation()  # probe once, before the threads race to do it

    def one(job):
        if callable(job):
            return job()
        job = dict(job)
        if "program" in job:
            return run_program(job.pop("program"), **job)
        return run_workflow(job.pop("code"), job.pop("problem"), **job)

    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)))
    try:
        futs = {pool.submit(one, job): i for i, job in enumerate(jobs)}
        for done, fut in enumerate(as_completed(futs), 1):
            if progress is not None:
                progress.update(1) if hasattr(progress, "update") else progress(done, len(jobs))
            yield futs[fut], fut.result()
    finally:
        # a consumer that stops early (a failed executor) must not wait for every queued job
        pool.shutdown(wait=True, cancel_futures=True)


# ---- CLI ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", nargs="?", help="Python file defining solve(problem)")
    ap.add_argument("--problem", help="the problem text passed to solve()")
    ap.add_argument("--executor", default="none", help="none | local | an OpenAI-compatible base URL")
    ap.add_argument("--model", default=None, help="executor model name (URL executors)")
    ap.add_argument("--context", default=None, help="JSON object of per-problem data (e.g. public_tests)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--mem-mb", type=int, default=1024)
    ap.add_argument("--max-calls", type=int, default=20)
    ap.add_argument("--info", action="store_true", help="print the isolation in force and exit")
    args = ap.parse_args(argv)
    if args.info:
        print(json.dumps({"isolation": isolation(), "mode": _MODE[0], "python": _MODE[2]}))
        return 0
    if args.workflow is None or args.problem is None:
        ap.error("WORKFLOW and --problem are required (or --info)")
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
    import operators

    with operators.make_executor(args.executor, model=args.model) as ex:
        res = run_workflow(code, args.problem, executor=ex, context=context, timeout=args.timeout,
                           mem_mb=args.mem_mb, max_calls=args.max_calls)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
