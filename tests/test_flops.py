"""flops.py: the model-FLOP counts of `python bench.py loop` equal a hand count and torch's own FLOP
counter on a tiny Llama with LoRA.

    python -m pytest -q tests/test_flops.py
"""
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig

import flops
import lora


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
    s = flops.shape_of(tiny())
    assert s == {"linear": 2 * 576, "lora": 2 * 256, "head": 80, "layers": 2, "d_attn": 8}
    # a micro-batch of one prompt [1 2 3] and completions [4 5], [6], [4 5] again (a member of two groups)
    mb = [{"ids": [1, 2, 3, 4, 5], "n_prompt": 3}, {"ids": [1, 2, 3, 6], "n_prompt": 3},
          {"ids": [1, 2, 3, 4, 5], "n_prompt": 3}]
    tokens = 3 + 2 + 1  # the prompt once, each distinct completion once
    pairs = (1 + 2 + 3) + (4 + 5) + 4  # causal query-key pairs: a position with c before it has c + 1
    rows = 2 + 1 + 2  # the head on every row's completion tokens
    assert flops.train_layout(mb) == (tokens, pairs, rows)
    fwd = 2 * (1152 + 512) * tokens + 4 * 2 * 8 * pairs + 2 * 80 * rows
    bwd = 2 * (1152 + 2 * 512) * tokens + 8 * 2 * 8 * pairs + 2 * 80 * rows
    assert flops.forward_flops(s, *flops.train_layout(mb)) == fwd == 21984
    assert flops.backward_flops(s, *flops.train_layout(mb)) == bwd
    # sampling.decode of prompts [1 2 3 4] and [1 2 5], n = 2: the prefix [1 2] once, suffixes [3 4] and
    # [5]; rows of 3, 1, 2, 0 tokens feed 2, 0, 1, 0 positions; the head at the prefix's end, each
    # prompt's end and every fed position
    got = flops.decode_layout([[1, 2, 3, 4], [1, 2, 5]], [[7, 8, 9], [7], [8, 8], []], 2)
    assert got == (2 + 2 + 1 + 3, (1 + 2) + (3 + 4) + 3 + (5 + 6) + 4, 1 + 2 + 3, 3 + 1 + 2 + 0)


def test_formulas_match_torch_flop_counter():
    """The naive reference: torch counts every matmul of a plain full-sequence forward and backward.
    Its attention is not causal (all T x T pairs are multiplied, then masked), so pairs = T^2 here.
    Backward: autograd skips the input gradients of layer 0's q/k/v (and their lora_A), whose input,
    the frozen embedding, needs none; the formula keeps them (its documented slack)."""
    m = tiny()
    for p in lora.lora_parameters(m):
        p.requires_grad_(True)
    s, T = flops.shape_of(m), 5
    with FlopCounterMode(display=False) as fc:
        logits = m(input_ids=torch.arange(T)[None]).logits
    assert fc.get_total_flops() == flops.forward_flops(s, T, T * T, T)
    with FlopCounterMode(display=False) as fc:
        logits.sum().backward()
    layer0_qkv = (8 * 8 + 8 * 4 + 8 * 4) + 3 * 2 * 8  # base weights + lora_A (r x d_in) of q, k, v
    assert fc.get_total_flops() == flops.backward_flops(s, T, T * T, T) - 2 * layer0_qkv * T


def test_an_executor_call_is_one_prompt_decoded_alone():
    u = {"prompt_tokens": 4, "completion_tokens": 3}
    s = flops.shape_of(tiny())  # one call = a decode of one prompt: prefix of 3, suffix of 1, 2 fed
    assert flops.call_flops(s, [(0, 1, u)]) == flops.forward_flops(s, 4 + 2, 10 + 5 + 6, 1 + 1 + 2)
    assert flops.call_flops(None, [(0, 1, u)]) == 0
