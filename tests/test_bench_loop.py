"""`python bench.py loop` (bench_loop.py): the --quick slice has a row for every phase with a sane
share and peak RSS, the FLOP counts equal a hand count and torch's own FLOP counter on a tiny Llama,
and the peak-RSS helpers see a buffer that RSS polling sees.

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

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig

import bench_loop
import lora
from conftest import ROOT


def test_quick_run_has_every_phase_with_a_share():
    p = subprocess.run([sys.executable, "bench.py", "loop", "--quick", "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
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


def tiny(r=2):
    """H=8, I=16, 2 layers, 2 heads of 4, 1 KV head, V=10, eager attention (plain matmuls), LoRA r on
    every projection: per layer q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x16, down 16x8 = 576 weights,
    LoRA r (d_in + d_out) each = 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24) = 256."""
    c = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(c, attn_implementation="eager").eval()
    lora.add_lora(m, r=r, alpha=2 * r)
    return m


def test_shape_and_formulas_match_a_hand_count():
    s = bench_loop.shape_of(tiny())
    assert s == {"linear": 2 * 576, "lora": 2 * 256, "head": 80, "layers": 2, "d_attn": 8}
    # a micro-batch of one prompt [1 2 3] and completions [4 5], [6], [4 5] again (a member of two groups)
    mb = [{"ids": [1, 2, 3, 4, 5], "n_prompt": 3}, {"ids": [1, 2, 3, 6], "n_prompt": 3},
          {"ids": [1, 2, 3, 4, 5], "n_prompt": 3}]
    tokens = 3 + 2 + 1  # the prompt once, each distinct completion once
    pairs = (1 + 2 + 3) + (4 + 5) + 4  # causal query-key pairs: a position with c before it has c + 1
    rows = 2 + 1 + 2  # the head on every row's completion tokens
    assert bench_loop.train_layout(mb) == (tokens, pairs, rows)
    fwd = 2 * (1152 + 512) * tokens + 4 * 2 * 8 * pairs + 2 * 80 * rows
    bwd = 2 * (1152 + 2 * 512) * tokens + 8 * 2 * 8 * pairs + 2 * 80 * rows
    assert bench_loop.forward_flops(s, *bench_loop.train_layout(mb)) == fwd == 21984
    assert bench_loop.backward_flops(s, *bench_loop.train_layout(mb)) == bwd
    # sampling.decode of prompts [1 2 3 4] and [1 2 5], n = 2: the prefix [1 2] once, suffixes [3 4] and
    # [5]; rows of 3, 1, 2, 0 tokens feed 2, 0, 1, 0 positions; the head at the prefix's end, each
    # prompt's end and every fed position
    got = bench_loop.decode_layout([[1, 2, 3, 4], [1, 2, 5]], [[7, 8, 9], [7], [8, 8], []], 2)
    assert got == (2 + 2 + 1 + 3, (1 + 2) + (3 + 4) + 3 + (5 + 6) + 4, 1 + 2 + 3, 3 + 1 + 2 + 0)


def test_formulas_match_torch_flop_counter():
    """The naive reference: torch counts every matmul of a plain full-sequence forward and backward.
    Its attention is not causal (all T x T pairs are multiplied, then masked), so pairs = T^2 here.
    Backward: autograd skips the input gradients of layer 0's q/k/v (and their lora_A), whose input,
    the frozen embedding, needs none; the formula keeps them (its documented slack)."""
    m = tiny()
    for p in lora.lora_parameters(m):
        p.requires_grad_(True)
    s, T = bench_loop.shape_of(m), 5
    with FlopCounterMode(display=False) as fc:
        logits = m(input_ids=torch.arange(T)[None]).logits
    assert fc.get_total_flops() == bench_loop.forward_flops(s, T, T * T, T)
    with FlopCounterMode(display=False) as fc:
        logits.sum().backward()
    layer0_qkv = (8 * 8 + 8 * 4 + 8 * 4) + 3 * 2 * 8  # base weights + lora_A (r x d_in) of q, k, v
    assert fc.get_total_flops() == bench_loop.backward_flops(s, T, T * T, T) - 2 * layer0_qkv * T


def test_busy_is_the_union_of_call_intervals():
    calls = [(0.0, 2.0, {}), (1.0, 3.0, {}), (5.0, 6.0, {}), (5.5, 5.7, {})]
    assert bench_loop.busy(calls) == 4.0
    u = {"prompt_tokens": 4, "completion_tokens": 3}
    s = bench_loop.shape_of(tiny())  # one call = a decode of one prompt: prefix of 3, suffix of 1, 2 fed
    assert bench_loop.call_flops(s, [(0, 1, u)]) == bench_loop.forward_flops(s, 4 + 2, 10 + 5 + 6, 1 + 1 + 2)
    assert bench_loop.call_flops(None, [(0, 1, u)]) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM and clear_refs are Linux's (proc(5))")
def test_peak_rss_sees_a_touched_buffer_and_resets():
    """The naive reference: VmRSS read while a 200 MB buffer, every page written, is alive. The peak
    of the block holds it after the buffer is freed (to within 4 MB: the kernel's RSS counters batch
    a few pages per CPU); a block measured after that does not."""
    base = bench_loop.status_kb("VmRSS") * 1024
    with bench_loop.measured() as m:
        buf = b"\x01" * (200 << 20)
        alive = bench_loop.status_kb("VmRSS") * 1024
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
