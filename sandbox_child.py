"""The sandbox child's runtime (ARCHITECTURE §4): sandbox.py passes this file's text to
`python -I -S -c` together with two pipe descriptors; it is never imported.

It is stdlib only and must stay compatible with any python3 >= 3.8 (as root the sandbox may run it
on /usr/bin/python3). It is trusted code until it calls exec(); after that the workflow shares its
process, so nothing the runtime does after exec() is a security boundary: the parent trusts the
child only for the answer text and counts calls / tokens / time itself.
"""
import _thread
import builtins
import ctypes
import json
import os
import re
import resource
import sys
import traceback


# mount(2) flags, and the mountinfo options a remount must repeat: a user namespace may not clear
# the nosuid / nodev / noexec / atime flags of a mount it inherited (they are locked)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
KEEP = {b"nosuid": MS_NOSUID, b"nodev": MS_NODEV, b"noexec": MS_NOEXEC, b"noatime": 1024, b"nodiratime": 2048,
        b"relatime": 1 << 21, b"strictatime": 1 << 24}


def seal(libc, notes, scratch):
    """Make every mount point of this (private) mount namespace read-only but `scratch`, the tmpfs
    that holds the work dir, and what lies under it (the read-only packages). Remounting "/" alone
    left every other mount as writable as the host has it: in the userns mode, where no uid is
    dropped, whatever our uid may write there (a home or data volume, a root-owned cgroup file when
    run as root). Each remount is MS_REMOUNT | MS_BIND, which changes this namespace's view of one
    mount, never the filesystem itself (without MS_BIND the host's filesystem would go read-only),
    and adds nosuid, and nodev outside /dev (whose device nodes, /dev/null among them, stay usable:
    writing a device node does not count as writing its filesystem). A mount that cannot be made
    read-only is named in the notes (isolation() shows them)."""
    with open("/proc/self/mountinfo", "rb") as f:
        rows = [line.split(b" - ")[0].split() for line in f]
    done = set()
    for row in reversed(rows):  # the last mount listed at a path is the one on top
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), row[4])
        opts = row[5].split(b",")
        if point in done or point == scratch or point.startswith(scratch + b"/"):
            continue
        done.add(point)
        if b"ro" in opts:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        flags |= 0 if point == b"/dev" or point.startswith(b"/dev/") else MS_NODEV
        for o in opts:
            flags |= KEEP.get(o, 0)
        if libc.mount(None, point, None, flags, None) != 0:
            notes.append("left writable: %s (errno %d)" % (point.decode(errors="replace"), ctypes.get_errno()))


def confine():
    """Read the run's config from the parent and put the isolation in force, in the order that keeps
    it safe: mounts while still (namespace-)root, limits, then privileges given up, then the audit
    hook. Returns (cfg, pipe from the parent, pipe to the parent, notes)."""
    from_parent = os.fdopen(int(sys.argv[1]), "rb")
    to_parent = os.fdopen(int(sys.argv[2]), "wb", 0)
    cfg = json.loads(from_parent.readline())
    notes = []  # what could not be put in force; the result carries them to the parent (isolation())
    uid = cfg["uid"]
    libc = None
    if cfg["mounts"] or uid is not None:
        libc = ctypes.CDLL(None, use_errno=True)
    if cfg["mounts"]:
        private_filesystem(libc, cfg, notes)
    if uid is not None and cfg["mounts"]:
        os.chown(cfg["workdir"], uid, uid)
    os.chdir(cfg["workdir"])
    set_limits(cfg, notes)
    if libc is not None:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot give root back
    if cfg["mounts"] and uid is None:
        drop_capabilities(libc, notes)
    if uid is not None:
        drop_to_uid(libc, uid)
    if cfg["block_net"]:
        block_network()
    if cfg.get("stdin") is not None:
        provide_stdin(cfg["stdin"])
    if cfg["site_dir"]:
        sys.path.append(cfg["site_dir"])  # after the stdlib: a package cannot shadow a stdlib module
    return cfg, from_parent, to_parent, notes


def private_filesystem(libc, cfg, notes):
    """We are PID 1 of fresh namespaces, still (namespace-)root: give the run a private tmpfs and
    make everything else read-only, before dropping privileges."""
    def mount(src, dst, fs, flags, data):
        if libc.mount(src, dst, fs, flags, data) != 0:
            notes.append("mount %s failed: errno %d" % (dst.decode(), ctypes.get_errno()))
            return False
        return True
    tmp_opts = ("size=%dk,mode=1777" % cfg["tmpfs_kb"]).encode()
    site = cfg["site_dir"]
    # hold each package dir open first: a venv under /tmp (a CI runner's, a newcomer's) is hidden
    # by the tmpfs below, and the bind then reads it through the descriptor instead of the path
    held = [(name, os.open(src, os.O_PATH | os.O_DIRECTORY)) for name, src in cfg["site"]] if site else []
    if mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, tmp_opts) and site:
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
    os.makedirs(cfg["workdir"], 0o700, exist_ok=True)
    seal(libc, notes, b"/tmp")


def set_limits(cfg, notes):
    """The run's resource limits. One that cannot be set is only noted, but not the CPU limit: set
    last and unguarded, it ends the child if it fails."""
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, cfg["fsize"]),
              (resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_AS, cfg["mem"])]
    if cfg["uid"] is not None:  # NPROC counts per uid; our uid is fresh, so this is per run
        limits.append((resource.RLIMIT_NPROC, cfg["nproc"]))
    for what, n in limits:
        try:
            resource.setrlimit(what, (n, n))
        except (ValueError, OSError) as e:
            notes.append("rlimit %d: %s" % (what, e))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu"], cfg["cpu"] + 1))


def drop_capabilities(libc, notes):
    """Namespace root with no uid to drop to (userns mode): give up every capability, or the
    workflow could simply remount / read-write. The bounding set first, so that exec'ing a program
    as uid 0 cannot hand them back."""
    for capability in range(64):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP
    class Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    empty = (ctypes.c_uint32 * 6)()
    if libc.capset(ctypes.byref(Hdr(0x20080522, 0)), empty) != 0:
        notes.append("capset failed: errno %d" % ctypes.get_errno())


def drop_to_uid(libc, uid):
    """Become the run's fresh, unprivileged uid, with no supplementary groups."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG=SIGKILL again: setuid() cleared it


def block_network():
    """No network namespace: refuse sockets (and the usual ways around the hook) in Python."""
    def hook(event, args):
        if event == "socket.__new__" and args[1] != 1 or event in (
                "ctypes.dlopen", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                "os.spawn", "os.fork", "os.forkpty", "pty.spawn"):
            raise PermissionError("sandbox: %s blocked" % event)
    sys.addaudithook(hook)


def provide_stdin(text):
    """`text` as fd 0: a memfd, else a file in the work dir."""
    fd = os.memfd_create("stdin") if hasattr(os, "memfd_create") else os.open(".stdin", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, text.encode())
    os.lseek(fd, 0, 0)
    os.dup2(fd, 0)
    os.close(fd)


def run_program(code):
    """Run `code` as __main__ and exit with its status, as `python program.py` would."""
    sys.argv = ["program"]
    status = 0
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            sys.stderr.write(str(e.code) + "\n")
    except BaseException:
        exc_type, exc, tb = sys.exc_info()
        traceback.print_exception(exc_type, exc, tb.tb_next)  # the program's frames, not ours
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(status & 255)


def run_workflow(cfg, from_parent, to_parent, notes):
    """Run `solve(problem)` with one stub per operator name, each a round trip to the parent, send
    the result ({answer} or {error}, and the notes) and exit."""
    dumps, cap = json.dumps, cfg["cap"]
    lock = _thread.allocate_lock()  # one call in flight: replies come back in order on one pipe

    def send(obj):
        to_parent.write(dumps(obj).encode() + b"\n")

    class OperatorError(Exception):
        pass

    def stub(name):
        def op(*args, **kwargs):
            with lock:
                send({"op": name, "args": list(args), "kwargs": kwargs})
                line = from_parent.readline()
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

    namespace = {"__name__": "workflow", "__builtins__": dict(builtins.__dict__), "OperatorError": OperatorError}
    for name in cfg["ops"]:
        namespace[name] = stub(name)
    out = {"notes": notes}
    try:
        exec(compile(cfg["code"], "<workflow>", "exec"), namespace)
        solve = namespace.get("solve")
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


# The untrusted code runs one call below this module's frame, as it did before the runtime was
# split into functions: one more call would take a frame from the code's recursion limit.
cfg, from_parent, to_parent, notes = confine()
if cfg["mode"] == "program":
    run_program(cfg["code"])
run_workflow(cfg, from_parent, to_parent, notes)
