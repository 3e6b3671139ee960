"""`python bench.py loop` (bench_loop.py): the --quick slice has a row for every phase with a sane
share and peak RSS, executor time is the union of the call intervals, and the peak-RSS helpers see a
buffer that RSS polling sees. Its FLOP counts: tests/test_flops.py. And `python bench.py decode`.

    python -m pytest -q tests/test_bench_loop.py
"""
import contextlib
import io
import json
import math
import subprocess
import sys
import time

import pytest

import bench_gpu
import bench_loop
from conftest import ROOT


@pytest.mark.parametrize("copied", [[], ["--prompt-kv", "repeat", "--checkpoint", "off"]])
def test_quick_run_has_every_phase_with_a_share(copied):
    p = subprocess.run([sys.executable, "bench.py", "loop", "--quick", "--json", *copied], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    assert (res["config"]["prompt_kv"], res["config"]["checkpoint"]) == (("repeat", "off") if copied else ("auto", "on"))
    rows = {r["phase"]: r for r in res["rows"]}
    assert list(rows) == list(bench_loop.PHASES)
    assert res["torch_threads"] == 1 and res["cpu"] and res["matmul"]["flop_per_s"] > 0
    for name, r in rows.items():
        assert r["seconds"] > 0, r
        if name == "sandbox":  # process time, no FLOPs
            assert r["flops"] is None and r["share"] is None and "workflows ran" in r["note"]
            continue
        assert r["flops"] > 0 and 0 < r["share"] < math.inf, r
        assert r["share"] == r["flop_per_s"] / res["matmul"]["flop_per_s"]
        assert r["flop_per_s"] == r["flops"] / r["seconds"] and r["tokens_per_s"] == r["tokens"] / r["seconds"]
    # the quick slice: 1 problem x 2 sampled workflows of <= 24 tokens, one greedy held-out workflow
    assert 0 < rows["decode"]["tokens"] <= 2 * 24 and 0 < rows["eval"]["tokens"] <= 24
    assert rows["executor"]["tokens"] > 0  # the fixed few-shot workflows (guides) call the stub executor
    for r in rows.values():
        assert r["peak_rss"] is None or (type(r["peak_rss"]) is int and r["peak_rss"] > 0), r
    if sys.platform == "linux":  # one peak per measured step: collect.collect, train.update, eval_generator
        assert rows["decode"]["peak_rss"] > 0 and rows["eval"]["peak_rss"] > 0 and rows["update"]["peak_rss"] > 0
        assert rows["decode"]["peak_rss"] == rows["executor"]["peak_rss"] == rows["sandbox"]["peak_rss"]
        assert rows["update"]["peak_rss"] == rows["pi_old"]["peak_rss"]
    assert res["server_peak_rss"] == []  # the stub executor runs in this process
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_loop.print_table(res)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("cpu: ") and "vector extensions:" in lines[0] and "torch threads: 1" in lines[0]
    assert "peak RSS" in lines[3] and any(line.startswith("peak RSS: ") for line in lines[4:])
    for label in bench_loop.PHASES.values():
        assert sum(line.startswith(label) for line in lines) == 1, label


def test_busy_is_the_union_of_call_intervals():
    calls = [(0.0, 2.0, {}), (1.0, 3.0, {}), (5.0, 6.0, {}), (5.5, 5.7, {})]
    assert bench_loop.busy(calls) == 4.0


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM and clear_refs are Linux's (proc(5))")
def test_peak_rss_sees_a_touched_buffer_and_resets():
    """The naive reference: VmRSS read while a 200 MB buffer, every page written, is alive. The peak
    of the block holds it after the buffer is freed (to within 4 MB: the kernel's RSS counters batch
    a few pages per CPU); a block measured after that does not."""
    base = bench_gpu.rss_kb("VmRSS") * 1024
    with bench_loop.measured() as m:
        buf = b"\x01" * (200 << 20)
        alive = bench_gpu.rss_kb("VmRSS") * 1024
        del buf
    assert alive >= base + 150e6 and m["rss"] >= alive - (4 << 20) and m["s"] > 0
    with bench_loop.measured() as after:
        pass
    assert after["rss"] < base + 150e6 <= m["rss"]


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/<pid>/task/<tid>/children is Linux's")
def test_server_rss_finds_a_marked_child_and_its_peak():
    code = "import time; b = b'x' * (100 << 20); print(flush=True); time.sleep(60)  # spogw-test-child"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        p.stdout.readline()  # its buffer is written
        assert bench_loop.server_rss(b"spogw-nobody") == []
        (peak,) = bench_loop.server_rss(b"spogw-test-child")
        assert peak >= 100 << 20
    finally:
        p.kill()
        p.wait()


def test_decode_bench_runs_every_variant_with_the_same_samples():
    """`python bench.py decode --quick`: the three decode variants, each in fresh processes, with
    ratios against the copied-prefix, full-sort baseline, and the same sampled tokens from all."""
    p = subprocess.run([sys.executable, "bench.py", "decode", "--quick", "--json", "--reps", "1", "--problems", "2",
                        "--n", "3", "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout)
    assert list(rows) == ["copied_full_sort", "copied", "held_once"]
    assert rows["copied_full_sort"]["time_ratio"] == 1.0
    for r in rows.values():
        assert r["same_samples"] and r["tokens"] > 0 and r["time_s"] > 0 and r["peak_mb"] > 0
