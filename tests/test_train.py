"""train.py update loop on a tiny model: direction of the update, masked KL, resume, bad input, and
the loss interface (losses.LOSSES) that a new loss plugs into."""
import argparse
import copy
import json

import pytest
import torch

import train
from conftest import tiny_llama, tiny_tokenizer
import kernels
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
    seqs = train.sequences([row], tok, losses.make(cfg()), 0)[0]
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
    loss = losses.make(c)
    loss.prepare(seqs)
    train.step_loss(mdl, seqs, loss)
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
        parts, lossfn = copy.deepcopy(seqs), losses.make(c)
        lossfn.prepare(parts)
        for mb in (parts[:1], parts[1:3], parts[3:]):
            train.step_loss(mdl, mb, lossfn)
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
    loss = losses.make(cfg(loss="scoredpo"))
    assert loss.unit == 2
    for q in lora.lora_parameters(mdl):
        q.requires_grad_(True)
    mdl.zero_grad(set_to_none=True)
    one = copy.deepcopy(seqs)
    loss.prepare(one)
    train.step_loss(mdl, one, loss)
    whole = [q.grad.clone() for q in lora.lora_parameters(mdl)]
    mdl.zero_grad(set_to_none=True)
    train.backward_step(mdl, copy.deepcopy(seqs), loss, budget)  # the micro-batches above, as update runs them
    split = [q.grad.clone() for q in lora.lora_parameters(mdl)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, split))


def test_rwr_token_weights_equal_rwr_loss():
    seqs = [{"ids": [1] * 3 + [5] * n, "n_prompt": 3, "score": s} for n, s in ((2, 1.0), (3, 0.0), (1, 0.5))]
    losses.make(cfg(loss="rwr")).prepare(seqs)
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


# ---- the loss interface: a fourth loss is one class in losses.py and one line of the knob table ----

class BestNLL(losses.Loss):
    """A toy loss: the negative log-likelihood of each group's best member, token mean over the step."""
    knobs = ("chunk_size",)

    def units(self, groups, seq, seed):
        return [[seq(g, max(g["members"], key=lambda m: m["score"]))] for g in groups]

    def prepare(self, seqs):
        n = sum(len(s["ids"]) - s["n_prompt"] for s in seqs)
        for s in seqs:
            s["w_t"] = [1.0 / n] * (len(s["ids"]) - s["n_prompt"])

    def loss(self, h, W, y, mb):
        w = torch.tensor([x for s in mb for x in s["w_t"]], device=h.device)
        return -(w * kernels.fused_logprobs(h, W, y, self.chunk_size)).sum(), {}


def test_a_new_loss_is_a_class_and_a_knob_line(tmp_path, monkeypatch):
    """Register BestNLL as losses.py would and add its name to the knob table's line: train.py's
    flags take it and update trains with it, with no other change anywhere."""
    monkeypatch.setitem(losses.LOSSES, "best_nll", BestNLL)
    default, names, *rest = config.KNOBS["loss"]
    monkeypatch.setitem(config.KNOBS, "loss", (default, names + ("best_nll",), *rest))
    ap = argparse.ArgumentParser()
    config.add_knobs(ap, config.STEPS)
    c = config.merge(None, ap.parse_args(["--loss", "best_nll", "--lr", "1e-2", "--epochs", "1"]))
    c.update(model="tiny")
    tok = tiny_tokenizer()
    mdl = lora.add_lora(tiny_llama(), r=4, alpha=8)
    row = make_groups(tmp_path / "iter_0", tok, ["5", "6", "41", "1 2"], [0.0, 1.0, 0.5, 0.0])
    before = member_logps(mdl, tok, row)
    assert train.update(tmp_path, 0, c, mdl, tok) == {"steps": 1, "sequences": 1}
    gain = [a - b for a, b in zip(member_logps(mdl, tok, row), before)]
    assert gain[1] > 0 and gain[1] == max(gain), gain  # the best member ("6") gained the most
    log = [json.loads(l) for l in (tmp_path / "iter_0" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and log[0]["kl"] is None and log[0]["loss"] > 0


def test_the_knob_table_lists_the_registered_losses_and_refuses_others(tmp_path, capsys):
    assert set(config.KNOBS["loss"][1]) == set(losses.LOSSES)
    with pytest.raises(SystemExit) as e:  # at argument parsing, before any work
        train.main(["--run", str(tmp_path / "r"), "--loss", "nope"])
    assert e.value.code == 2 and "--loss" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    (tmp_path / "config.json").write_text(json.dumps({"loss": "nope"}))  # a hand-edited run config
    with pytest.raises(train.DataError, match="--loss must be one of"):
        config.merge(tmp_path, argparse.Namespace())
    with pytest.raises(ValueError, match="--loss must be one of"):
        losses.make(cfg(loss="nope"))
