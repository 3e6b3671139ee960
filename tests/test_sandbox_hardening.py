"""Issue 24's sandbox hardening: a sandbox that cannot start is an infrastructure fault (exit 2
with `error: ...` for the CLIs, never a traceback, never a workflow's score), and the namespace
modes leave no mount writable but the child's own tmpfs that holds its work dir."""
import os
import subprocess
import sys
import time

import pytest

import operators
import sandbox
from conftest import ROOT

FORCED_BAD = dict(os.environ, SPOGW_SANDBOX_ISOLATION="bogus")  # a mode no machine has: isolation() fails


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=FORCED_BAD)


def test_a_sandbox_that_cannot_start_is_exit_2_for_the_clis(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("print(1)\n")
    wf = tmp_path / "wf.py"
    wf.write_text("def solve(problem):\n    return '4'\n")
    for p in (run("sandbox.py", "--info"), run("sandbox.py", str(prog)), run("operators.py", str(wf), "--problem", "2+2?"),
              run("evaluate.py", "--baseline", "io", "--bench", "arith", "--executor", "none", "--limit", "1",
                  cwd=tmp_path)):
        assert p.returncode == 2, p.stderr[-2000:]
        assert "error: SPOGW_SANDBOX_ISOLATION='bogus' is not available here" in p.stderr
        assert "Traceback" not in p.stderr


def test_an_operator_sandbox_that_cannot_start_is_never_a_score(monkeypatch):
    """The programmer and test operators start sandboxes of their own inside the operator handler,
    which hands any exception to the workflow as an operator error: that run would be scored 0
    although nothing of the workflow's ran."""
    sandbox.isolation()

    def nested(ctx, text):
        with monkeypatch.context() as m:  # only this inner sandbox fails to start (fork refused)
            m.setattr(sandbox.subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(OSError(11, "no fork")))
            return sandbox.run_program("print(1)")["stdout"]

    code = "def solve(p):\n    try:\n        return run(p)\n    except Exception as e:\n        return 'caught ' + str(e)\n"
    with pytest.raises(sandbox.SandboxError, match="cannot start the sandbox child.*no fork"):
        operators.run_workflow(code, "p", operators={"run": nested}, timeout=20)
    assert operators.run_workflow(code, "p", operators={"run": lambda ctx, t: t.upper()}, timeout=20)["answer"] == "P"


WRITABLE = r'''
top = {}
for line in open("/proc/self/mountinfo"):
    f = line.split(" - ")[0].split()
    top[f[4]] = f[5].split(",")  # the last mount listed at a path is the one on top
print(sorted(p for p, o in top.items() if "ro" not in o))
open("here", "w").write("the work dir stays writable")
open("/dev/null", "w").write("and /dev/null usable")
print(open("here").read())
'''


@pytest.mark.parametrize("mode", ["ns", "userns"])
def test_no_mount_but_the_work_dir_is_writable(monkeypatch, mode):
    """Remounting "/" read-only left /proc, /sys, the cgroup files, /dev and any volume as writable as
    the host has them; in the userns mode nothing else (no uid drop) stood between them and the code."""
    monkeypatch.setenv("SPOGW_SANDBOX_ISOLATION", mode)
    for k, v in (("_MODE", None), ("ISOLATION", "unprobed"), ("_SITE", (None, []))):
        monkeypatch.setattr(sandbox, k, v)
    try:
        iso = sandbox.isolation()
    except sandbox.SandboxError:
        pytest.skip(f"the {mode} mode is not available here")
    host = open("/proc/self/mountinfo").read()
    r = sandbox.run_program(WRITABLE, timeout=30)
    assert r["ok"] and r["stdout"].splitlines() == ["['/tmp']", "the work dir stays writable"], r
    assert "left writable" not in iso, iso
    assert open("/proc/self/mountinfo").read() == host  # every remount stayed in the child's namespace


def force_mode(monkeypatch, mode):
    """Make the sandbox probe again with SPOGW_SANDBOX_ISOLATION=mode; skip where that mode cannot run."""
    monkeypatch.setenv("SPOGW_SANDBOX_ISOLATION", mode)
    for k, v in (("_MODE", None), ("ISOLATION", "unprobed"), ("_SITE", (None, []))):
        monkeypatch.setattr(sandbox, k, v)
    try:
        sandbox.isolation()
    except sandbox.SandboxError:
        pytest.skip(f"the {mode} mode is not available here")


@pytest.mark.parametrize("mode", ["ns", "userns", "uid", "none"])
def test_every_mode_keeps_the_whole_answer(monkeypatch, mode):
    """The userns mode's capability loop reused the name of the output cap: every answer came back
    clipped to 63 characters."""
    force_mode(monkeypatch, mode)
    r = sandbox.run_workflow("def solve(p):\n    return p * 100\n", "x", [], None, timeout=30)
    assert r == dict(answer="x" * 100, error=None, seconds=r["seconds"]), r


def _running_in_group(pgid):
    """Pids of the processes of group `pgid` that still run (a zombie runs nothing: its parent reaps it)."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            state, _, group = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                out.append(int(pid))
        except (OSError, ValueError):
            pass
    return out


@pytest.mark.parametrize("mode", ["ns", "userns", "uid", "none"])
def test_an_interrupt_inside_the_broker_loop_leaves_nothing(monkeypatch, mode):
    """_spawn had no try/finally: a KeyboardInterrupt (or any exception) out of the broker loop left the
    child running, blocked on the reply to its operator call, unreaped, our ends of its pipes open
    and, without a mount namespace, its temp dir on disk."""
    force_mode(monkeypatch, mode)
    started, start, take = [], sandbox._start, sandbox._take_message

    def interrupted(buf):  # the child's first message, its operator call: Ctrl-C lands here, once
        monkeypatch.setattr(sandbox, "_take_message", take)
        raise KeyboardInterrupt

    def recorded(argv, cfg, *rest):
        started.append((start(argv, cfg, *rest), cfg))
        return started[-1][0]

    monkeypatch.setattr(sandbox, "_start", recorded)
    monkeypatch.setattr(sandbox, "_take_message", interrupted)
    fds = len(os.listdir("/proc/self/fd"))
    wf = "def solve(p):\n    return op(p)\n"
    with pytest.raises(KeyboardInterrupt):
        sandbox.run_workflow(wf, "x", ["op"], lambda msg: {"ok": "y"}, timeout=30)
    ((proc, *_), cfg), = started
    assert proc.returncode is not None  # killed and reaped
    for _ in range(100):  # with a PID namespace the child's own child is reaped by init, not by us
        if not _running_in_group(proc.pid):
            break
        time.sleep(0.05)
    assert _running_in_group(proc.pid) == []
    assert len(os.listdir("/proc/self/fd")) == fds  # its pipes and the selector are closed
    assert sandbox._MODE[4] or not os.path.exists(cfg["workdir"])  # no mount namespace: its temp dir is gone
    assert sandbox.run_workflow(wf, "x", ["op"], lambda msg: {"ok": "y"}, timeout=30)["answer"] == "y"
