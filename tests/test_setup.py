"""What a newcomer's virtual environment needs: the local executor's server is started with the
interpreter that runs spogw, never a script found elsewhere on PATH."""
import os
import subprocess
import sys

import executor


def test_local_server_runs_with_this_interpreter_from_any_directory(tmp_path):
    # the server is started as [sys.executable, executor.SERVE, ...]: sys.executable, not its
    # realpath (in a venv the realpath is the base interpreter, whose site-packages may not hold
    # torch at all: the bug a newcomer hit), and an absolute path, so the cwd does not matter
    assert os.path.isabs(executor.SERVE) and os.path.isfile(executor.SERVE)
    r = subprocess.run([sys.executable, executor.SERVE, "--help"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--orphan-exit" in r.stdout
