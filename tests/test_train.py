"""train.py update loop on a tiny model: direction of the update, masked KL, resume, bad input."""
import copy
import json

import pytest
import torch

import train
from conftest import tiny_llama, tiny_tokenizer
import lora
import losses
import sampling
import config

PROMPT = [{"role": "user", "content": "what is 2+3?"}]


def cfg(**kw):
    c = dict(config.defaults(), seed=0, model="tiny")
    c.update(kw)
    return c


def make_groups(path, tok, completions, scores):
    adv = losses.advantages(scores)
    members = [{"sample": i, "completion": c, "completion_ids": tok(c, add_special_tokens=False)["input_ids"] + [2],
                "score": s, "advantage": a} for i, (c, s, a) in enumerate(zip(completions, scores, adv))]
    row = {"problem_id": "p0", "prompt": PROMPT, "prefill": "", "members": members, "std": 0.5, "mil": 1.0}
    path.mkdir(parents=True, exist_ok=True)
    (path / "groups.jsonl").write_text(json.dumps(row) + "\n")
    return row


def member_logps(mdl, tok, row):
    seqs = train.sequences([row], tok, "grpo", 0, 0)[0]
    return [sum(x) for x in train.seq_logprobs(mdl, seqs, 4096, 1024)]


def test_update_moves_positive_up_negative_down(tmp_path):
    tok = tiny_tokenizer()
    mdl = lora.add_lora(tiny_llama(), r=4, alpha=8)
    row = make_groups(tmp_path / "iter_0", tok, ["5", "6", "41", "1 2"], [1.0, 0.0, 1.0, 0.0])
    before = member_logps(mdl, tok, row)
    train.update(tmp_path, 0, cfg(lr=1e-2, epochs=3, groups_per_step=1), mdl, tok)
    after = member_logps(mdl, tok, row)
    for b, a, m in zip(before, after, row["members"]):
        assert (a > b) == (m["advantage"] > 0), (b, a, m["advantage"])
    assert (tmp_path / "iter_1" / "adapter" / "adapter_model.safetensors").is_file()
    log = [json.loads(l) for l in (tmp_path / "iter_0" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert set(log[0]) >= {"step", "loss", "pg", "kl", "clip_frac", "grad_norm", "lr", "tokens_per_s"}


def grads_for(mdl, tok, seqs, c):
    mdl.zero_grad(set_to_none=True)
    params = lora.lora_parameters(mdl)
    for p in params:
        p.requires_grad_(True)
    train.prepare_step(seqs, c)
    train.step_loss(mdl, seqs, c)
    return [p.grad.clone() for p in params]


def test_masked_kl_gives_negative_sequences_no_kl_gradient():
    tok = tiny_tokenizer()
    mdl = lora.add_lora(tiny_llama(), r=4, alpha=8)
    for m in lora.lora_modules(mdl).values():  # theta != ref, so the KL has a gradient to give
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    p = sampling.prompt_ids(tok, PROMPT)
    base = [{"ids": p + tok(c, add_special_tokens=False)["input_ids"], "n_prompt": len(p), "adv": a, "score": 0.0}
            for c, a in (("12", -1.0), ("7 7", -0.5))]
    with lora.lora_disabled(mdl):
        refs = train.seq_logprobs(mdl, base, 4096, 1024)
    olds = train.seq_logprobs(mdl, base, 4096, 1024)
    for s, r, o in zip(base, refs, olds):
        s.update(ref=r, old=o)
    # all-negative batch: masked KL == no KL, full KL differs
    g_masked = grads_for(mdl, tok, copy.deepcopy(base), cfg(kl="masked", beta=1.0))
    g_none = grads_for(mdl, tok, copy.deepcopy(base), cfg(kl="none", beta=1.0))
    g_full = grads_for(mdl, tok, copy.deepcopy(base), cfg(kl="full", beta=1.0))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_masked, g_none))
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(g_full, g_none))
    # flip the signs: now masked KL applies, and equals full
    pos = copy.deepcopy(base)
    for s in pos:
        s["adv"] = -s["adv"]
    g_masked = grads_for(mdl, tok, copy.deepcopy(pos), cfg(kl="masked", beta=1.0))
    g_full = grads_for(mdl, tok, copy.deepcopy(pos), cfg(kl="full", beta=1.0))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_masked, g_full))


def test_micro_batches_add_up_to_one_batch():
    tok = tiny_tokenizer()
    mdl = lora.add_lora(tiny_llama(), r=4, alpha=8)
    for m in lora.lora_modules(mdl).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    p = sampling.prompt_ids(tok, PROMPT)
    seqs = [{"ids": p + tok(c, add_special_tokens=False)["input_ids"], "n_prompt": len(p), "adv": a, "score": s}
            for c, a, s in (("12", 1.0, 1.0), ("7 7", -1.0, 0.0), ("abc", 0.5, 0.7), ("9", -0.5, 0.2))]
    lps = train.seq_logprobs(mdl, seqs, 4096, 1024)
    for s, lp in zip(seqs, lps):
        s.update(old=[x - 0.05 for x in lp], ref=[x + 0.1 for x in lp], ref_sum=sum(lp) + 0.3)
    for loss in ("grpo", "rwr"):
        c = cfg(loss=loss, agg="seq")
        whole = grads_for(mdl, tok, copy.deepcopy(seqs), c)
        mdl.zero_grad(set_to_none=True)
        parts = copy.deepcopy(seqs)
        train.prepare_step(parts, c)
        for mb in (parts[:1], parts[1:3], parts[3:]):
            train.step_loss(mdl, mb, c)
        split = [q.grad.clone() for q in lora.lora_parameters(mdl)]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, split)), loss


def test_scoredpo_micro_batches_keep_pairs_whole_and_add_up():
    """A token budget that fits three rows would cut a pair in two (the winner's sum in one micro-batch,
    the loser's in the next); with unit=2 every micro-batch holds whole pairs and the pair-share
    scaling adds the micro-batch losses up to the one-batch loss."""
    tok = tiny_tokenizer()
    mdl = lora.add_lora(tiny_llama(), r=4, alpha=8)
    for m in lora.lora_modules(mdl).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    p = sampling.prompt_ids(tok, PROMPT)
    comps = [("12", 1.0), ("7 7", 0.0), ("abc d", 0.8), ("9", 0.1), ("x y", 1.0), ("zz", 0.3)]  # (winner, loser) x 3
    seqs = [{"ids": p + tok(c, add_special_tokens=False)["input_ids"], "n_prompt": len(p), "score": sc} for c, sc in comps]
    lps = train.seq_logprobs(mdl, seqs, 4096, 1024)
    for s, lp in zip(seqs, lps):
        s.update(old=lp, ref=lp, ref_sum=sum(lp) - 0.2)
    longest = max(len(s["ids"]) - len(p) for s in seqs)
    budget = len(p) + 3 * longest
    assert any(len(mb) % 2 for mb in train.micro_batches(seqs, budget))  # the cut a pair-blind split makes
    mbs = train.micro_batches(seqs, budget, unit=2)
    assert len(mbs) > 1 and all(len(mb) % 2 == 0 for mb in mbs) and sum(mbs, []) == seqs
    c = cfg(loss="scoredpo")
    for q in lora.lora_parameters(mdl):
        q.requires_grad_(True)
    mdl.zero_grad(set_to_none=True)
    one = copy.deepcopy(seqs)
    train.prepare_step(one, c)
    one[0]["pair_share"] = 1.0
    train.step_loss(mdl, one, c)
    whole = [q.grad.clone() for q in lora.lora_parameters(mdl)]
    mdl.zero_grad(set_to_none=True)
    parts = copy.deepcopy(seqs)
    train.prepare_step(parts, c)
    for mb in train.micro_batches(parts, budget, unit=2):
        mb[0]["pair_share"] = (len(mb) / 2) / (len(parts) / 2)  # as update() sets it
        train.step_loss(mdl, mb, c)
    split = [q.grad.clone() for q in lora.lora_parameters(mdl)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, split))


def test_rwr_token_weights_equal_rwr_loss():
    seqs = [{"ids": [1] * 3 + [5] * n, "n_prompt": 3, "score": s} for n, s in ((2, 1.0), (3, 0.0), (1, 0.5))]
    train.prepare_step(seqs, cfg(loss="rwr"))
    logp = [torch.randn(len(s["ids"]) - 3, dtype=torch.float64) for s in seqs]
    ours = -sum((torch.tensor(s["w_t"], dtype=torch.float64) * lp).sum() for s, lp in zip(seqs, logp))
    ref = losses.rwr_loss(torch.stack([lp.mean() for lp in logp]), [s["score"] for s in seqs], tau=0.4)
    assert torch.allclose(ours, ref)


def test_update_resumes_between_steps(tmp_path):
    """Kill training between steps 2 and 3 (after step 2's state and log row are on disk), restart
    in a fresh model: the final adapter equals an uninterrupted run's and the log has no duplicates."""
    tok = tiny_tokenizer()
    comps, scores = ["5", "6", "41", "1 2"], [1.0, 0.0, 1.0, 0.0]
    c = cfg(lr=1e-2, epochs=4, groups_per_step=1, save_every=1)
    full = lora.add_lora(tiny_llama(), r=4, alpha=8)
    make_groups(tmp_path / "a" / "iter_0", tok, comps, scores)
    train.update(tmp_path / "a", 0, c, full, tok)

    class Killed(Exception):
        pass

    rows = {"n": 0}
    real_append = train.append_jsonl

    def append_then_die(f, row):
        real_append(f, row)
        rows["n"] += 1
        if rows["n"] == 2:
            raise Killed

    make_groups(tmp_path / "b" / "iter_0", tok, comps, scores)
    train.append_jsonl = append_then_die
    try:
        with pytest.raises(Killed):
            train.update(tmp_path / "b", 0, c, lora.add_lora(tiny_llama(), r=4, alpha=8), tok)
    finally:
        train.append_jsonl = real_append
    assert (tmp_path / "b" / "iter_0" / "train_state.pt").is_file()
    assert not (tmp_path / "b" / "iter_1").exists()
    fresh = lora.add_lora(tiny_llama(), r=4, alpha=8)  # as a new process would: base weights, state from disk
    train.update(tmp_path / "b", 0, c, fresh, tok)
    for a, b in zip(lora.lora_parameters(full), lora.lora_parameters(fresh)):
        assert torch.allclose(a, b, atol=1e-6)
    log = [json.loads(l)["step"] for l in (tmp_path / "b" / "iter_0" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    assert not (tmp_path / "b" / "iter_0" / "train_state.pt").exists()


def test_malformed_groups_named(tmp_path):
    d = tmp_path / "iter_0"
    d.mkdir()
    (d / "groups.jsonl").write_text('{"problem_id": "p", "prompt": [], "members": []}\n{"problem_id": \n')
    with pytest.raises(train.DataError, match=r"groups.jsonl:2"):
        train.update(tmp_path, 0, cfg(), lora.add_lora(tiny_llama(), r=4, alpha=8), tiny_tokenizer())


def test_step_order_is_a_permutation_that_keeps_problems_together():
    units = [[{"ids": [p, p, 9, i], "n_prompt": 2}] for p in (1, 2, 3) for i in range(4)]
    import random
    random.Random(0).shuffle(units)
    orders = {tuple(train.step_order(units, s)) for s in range(5)}
    assert len(orders) > 1  # seeded, not fixed
    for order in orders:
        assert sorted(order) == list(range(len(units)))
        probs = [units[i][0]["ids"][0] for i in order]
        runs = [p for j, p in enumerate(probs) if j == 0 or probs[j - 1] != p]
        assert len(runs) == 3  # each problem's units form one run
