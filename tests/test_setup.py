"""What a newcomer's virtual environment needs: the local executor's server is started with the
interpreter that runs spogw, never a `transformers` script found elsewhere."""
import os
import subprocess
import sys

import executor


def test_transformers_cli_runs_with_this_interpreter(tmp_path):
    cmd = executor.transformers_cli()
    # sys.executable, not its realpath: in a venv the realpath is the base interpreter, whose
    # site-packages may not hold transformers at all (the bug a newcomer hit)
    assert cmd[0] == sys.executable
    r = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--continuous-batching" in r.stdout

