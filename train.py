"""Train: the --iter driver (collect -> curate -> update, then evaluate and report) and the update step.

    python train.py --iter 3                                      # the default run: arith, embedded models, CPU
    python train.py --iter 1 --smoke --run runs/smoke             # the whole loop, tiny (~2 min on 2 cores)
    python train.py --iter 3 --loss scoredpo --run runs/sdpo      # ScoreFlow's Score-DPO on the same loop
    python train.py --iter 2 --mode refine --run runs/w4s         # W4S refinement, trained with RWR
    python train.py --iter 3 --run runs/kl-full --kl full --data-from runs/default   # an ablation on the same data

Iteration k: collect.py fills iter_k/rollouts.jsonl (refine.py: refine.jsonl), curate.py writes
iter_k/groups.jsonl, update() trains the LoRA on them into iter_{k+1}/adapter (ARCHITECTURE §1). A
step whose output exists is skipped, so a killed run resumes. pi_old and pi_ref are scored on the
loss's own micro-batches and precision (ARCHITECTURE §8): at the first step pi_theta / pi_old = 1.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import benchmarks
import collect
import config
import curate
import evaluate
import generator
import kernels
import lora
import losses
import model
import refine
import report
import rollout
import sampling
import workflow
from jsonl import (DataError, append_jsonl, read_json, read_jsonl, truncate_torn_tail, update_json, write_atomic,
                   write_jsonl_atomic)

GROUP_KEYS = ("problem_id", "prompt", "members")


def checkpointing(cfg, device):
    """Activation checkpointing on? auto: on a GPU, where activations, not time, bound a 7B step
    (~9.5 MiB per budget token without it); off on a CPU, where the 135M default fits easily and
    the recomputation would only cost time."""
    c = cfg.get("checkpoint", "auto")
    return torch.device(device).type == "cuda" if c == "auto" else c == "on"


def sequences(groups, tok, loss, pairs_per_problem, seed):
    """The training examples of one iteration, as a list of steps' worth of units.
    grpo/rwr: one unit per group, members = sequences with an advantage (grpo) or a score (rwr).
    scoredpo: one unit per problem, members = sampled (winner, loser) pairs of its distinct workflows.
    A sequence's prompt is the token ids its sampler saw (the member's or the group's `prompt_ids`);
    groups of runs that did not store them are re-rendered from the messages."""

    rendered = {}

    def prompt_of(g, m):
        ids = m.get("prompt_ids") or g.get("prompt_ids")
        if not ids:  # rendered once per group, as before prompt ids were stored
            if id(g) not in rendered:
                rendered[id(g)] = sampling.prompt_ids(tok, g["prompt"], g.get("prefill") or None)
            ids = rendered[id(g)]
        return list(ids)

    units = []
    if loss in ("grpo", "rwr"):
        for g in groups:
            unit = []
            for m in g["members"]:
                p = prompt_of(g, m)
                unit.append({"ids": p + m["completion_ids"], "n_prompt": len(p), "adv": m["advantage"], "score": m["score"]})
            units.append(unit)
        return units
    by_problem = {}
    for g in groups:  # a problem's groups overlap: pool its distinct workflows
        d = by_problem.setdefault(g["problem_id"], {"m": {}})
        for m in g["members"]:
            d["m"][m["sample"]] = (g, m)
    for k, (pid, d) in enumerate(sorted(by_problem.items())):
        ms = list(d["m"].values())
        pairs = losses.sample_pairs([m["score"] for _, m in ms], pairs_per_problem, seed + k)
        unit = []
        for w, l in pairs:
            for i in (w, l):
                g, m = ms[i]
                p = prompt_of(g, m)
                unit.append({"ids": p + m["completion_ids"], "n_prompt": len(p), "score": m["score"]})
        if unit:
            units.append(unit)
    return units


def micro_batches(seqs, budget, unit=1):
    """Consecutive runs of sequences whose forward stays within `budget` tokens, counted as the
    forward runs them (forward_hidden): each distinct prompt once, plus rows x longest completion.
    Cuts fall only between runs of `unit` sequences: with unit=2 scoredpo's pairs are never split
    (a single pair over the budget still goes alone)."""
    out, cur, prompts, longest = [], [], set(), 0
    for i in range(0, len(seqs), unit):
        chunk = seqs[i:i + unit]
        keys = {tuple(s["ids"][:s["n_prompt"]]) for s in chunk}
        T = max(len(s["ids"]) - s["n_prompt"] for s in chunk)
        if cur and sum(map(len, prompts | keys)) + max(longest, T) * (len(cur) + len(chunk)) > budget:
            out.append(cur)
            cur, prompts, longest = [], set(), 0
        cur.extend(chunk)
        prompts |= keys
        longest = max(longest, T)
    if cur:
        out.append(cur)
    return out


def forward_hidden(mdl, mb, ckpt=False):
    """(hidden [N, H], weight, targets [N]) of the completion tokens of a micro-batch, sequences in
    order. Sequences with the same prompt (a group, a problem's pairs) share one prompt forward, and a
    workflow that sits in several groups runs once: its rows are repeated, so its gradient adds up.
    This is the one forward of the update: pi_old, pi_ref and pi_theta all go through it, in the
    model's precision (model.precision) and on the same micro-batches, so that at the first step of an
    iteration pi_theta == pi_old holds bit for bit (rho = 1, KL = 0), in bf16 too."""
    by_prompt = {}
    for i, s in enumerate(mb):
        comps = by_prompt.setdefault(tuple(s["ids"][:s["n_prompt"]]), {})
        comps.setdefault(tuple(s["ids"][s["n_prompt"]:]), []).append(i)
    rows, W = [None] * len(mb), None
    with model.precision(mdl), model.checkpointed(mdl, ckpt):
        for prompt, comps in by_prompt.items():
            h, W, y = model.shared_prompt_hidden(mdl, list(prompt), [list(c) for c in comps])
            off = 0
            for c, idx in comps.items():
                for i in idx:
                    rows[i] = (h[off:off + len(c)], y[off:off + len(c)])
                off += len(c)
    # the LM head runs in the weights' dtype (the fused kernels keep their softmax math in fp32)
    return torch.cat([r[0] for r in rows]).to(W.dtype), W, torch.cat([r[1] for r in rows])


@torch.no_grad()
def seq_logprobs(mdl, seqs, budget, chunk_size, unit=1, ckpt=False):
    """Per-sequence lists of completion-token log-probs (no grad): pi_old / pi_ref. Called with one
    step's sequences, it cuts the same micro-batches as that step's update (micro_batches is a pure
    function of the sequences), so both see the same batch shapes and hence the same arithmetic."""
    out = []
    for mb in micro_batches(seqs, budget, unit):
        h, W, y = forward_hidden(mdl, mb, ckpt)
        lp = kernels.fused_logprobs(h, W, y, chunk_size).cpu()
        out.extend(t.tolist() for t in lp.split([len(s["ids"]) - s["n_prompt"] for s in mb]))
    return out


def step_loss(mdl, mb, cfg):
    """Backward one micro-batch; every sequence carries its precomputed token weight / coefficients
    (set by `update` over the whole step) so micro-batches add up to the full-step loss."""
    device = next(mdl.parameters()).device
    cat = lambda key: torch.tensor([x for s in mb for x in s[key]], device=device)
    h, W, y = forward_hidden(mdl, mb, checkpointing(cfg, device))
    if cfg["loss"] == "grpo":
        loss, m = kernels.fused_grpo_loss(h, W, y, cat("old"), cat("ref"), cat("adv_t"), cat("w_t"), cat("km_t"),
                                          cfg["beta"], cfg["eps"], cfg["chunk_size"])
        loss.backward()
        return loss.item(), m
    logp = kernels.fused_logprobs(h, W, y, cfg["chunk_size"])
    if cfg["loss"] == "rwr":  # -sum_i w_i mean_t logp_it with w normalised over the step: token weight w_i / T_i
        loss = -(cat("w_t") * logp).sum()
        loss.backward()
        return loss.item(), {}
    # scoredpo: sequence sums, pairs (w, l) adjacent, loss scaled by the micro-batch's share of pairs
    seg = torch.repeat_interleave(torch.arange(len(mb), device=device),
                                  torch.tensor([len(s["ids"]) - s["n_prompt"] for s in mb], device=device))
    sums = torch.zeros(len(mb), device=device, dtype=logp.dtype).index_add(0, seg, logp)
    ref = torch.tensor([s["ref_sum"] for s in mb], device=device, dtype=logp.dtype)
    sc = torch.tensor([s["score"] for s in mb], device=device, dtype=logp.dtype)
    loss = losses.score_dpo_loss(sums[0::2], ref[0::2], sums[1::2], ref[1::2], sc[0::2], sc[1::2], cfg["beta"]) * mb[0]["pair_share"]
    loss.backward()
    return loss.item(), {}


def step_order(units, seed):
    """A random order of the units (groups) that keeps each problem's units together: the prompt is
    the costly part of a step (~1000 tokens, forward and backward) and a problem's groups share it,
    so a step of 4 groups of one problem costs about a quarter of 4 groups of 4 problems."""
    rng = random.Random(seed)
    prompt = [tuple(u[0]["ids"][:u[0]["n_prompt"]]) if u else () for u in units]
    problems = list(dict.fromkeys(prompt))
    rng.shuffle(problems)
    rank = {p: i for i, p in enumerate(problems)}
    order = list(range(len(units)))
    rng.shuffle(order)
    return sorted(order, key=lambda i: rank[prompt[i]])


def prepare_step(seqs, cfg):
    """Per-token weights / masks / advantages of one optimizer step (ARCHITECTURE §7)."""
    n = [len(s["ids"]) - s["n_prompt"] for s in seqs]
    seg = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(n))
    if cfg["loss"] == "grpo":
        adv = torch.tensor([s["adv"] for s in seqs])
        w = losses.token_weights(seg, len(seqs), cfg["agg"]).float()
        km = losses.kl_token_mask(adv, seg, cfg["kl"])
        for s, wi, ki in zip(seqs, w.split(n), km.split(n)):
            s.update(w_t=wi.tolist(), km_t=ki.tolist(), adv_t=[s["adv"]] * len(wi))
    elif cfg["loss"] == "rwr":
        r = torch.tensor([s["score"] for s in seqs])
        wseq = torch.softmax(r / cfg["tau"], 0)  # exp(r/tau) / sum exp(r/tau)
        for s, wi, Ti in zip(seqs, wseq.tolist(), n):
            s["w_t"] = [wi / Ti] * Ti
    else:
        for s in seqs:
            s["pair_share"] = None  # set per micro-batch below


def update(run_dir, it, cfg, mdl, tok):
    """One SPOGW update on iter_<it>/groups.jsonl -> iter_<it+1>/adapter. `mdl` carries the LoRA of
    iteration `it` (pi_old); it is trained in place. Resumes from iter_<it>/train_state.pt."""

    d = Path(run_dir) / f"iter_{it}"
    out = Path(run_dir) / f"iter_{it + 1}" / "adapter"
    groups = read_jsonl(d / "groups.jsonl", required=GROUP_KEYS)
    units = sequences(groups, tok, cfg["loss"], cfg["pairs_per_problem"], seed=cfg["seed"] * 7919 + it)
    flat = [s for u in units for s in u]
    budget, cs, unit = cfg["token_budget"], cfg["chunk_size"], 2 if cfg["loss"] == "scoredpo" else 1
    ckpt = checkpointing(cfg, next(mdl.parameters()).device)
    upg = max(1, cfg["groups_per_step"])
    steps_per_epoch = math.ceil(len(units) / upg)
    mdl.eval()  # no dropout: pi_theta == pi_old exactly at the first step
    # pi_old (and pi_ref) once, before the first update, no grad, step by step in epoch 0's order:
    # each sequence is scored in the very micro-batch its first update step will run
    first = step_order(units, cfg["seed"] * 1_000_003 + it * 1000)
    for k in range(steps_per_epoch):
        seqs = [s for u in first[k * upg:(k + 1) * upg] for s in units[u]]
        olds = seq_logprobs(mdl, seqs, budget, cs, unit, ckpt)
        if cfg["loss"] == "scoredpo" or cfg["ref"] == "base":
            with lora.lora_disabled(mdl):
                refs = seq_logprobs(mdl, seqs, budget, cs, unit, ckpt)
        else:
            refs = olds
        for s, o, r in zip(seqs, olds, refs):
            s["old"], s["ref"], s["ref_sum"] = o, r, sum(r)
    params = lora.lora_parameters(mdl)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = steps_per_epoch * cfg["epochs"]
    state_path, log_path = d / "train_state.pt", d / "train_log.jsonl"
    start = 0
    if state_path.is_file():  # resume between steps: weights, optimizer and step count
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for p, v in zip(params, state["lora"]):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
        start = state["step"]
    truncate_torn_tail(log_path)
    if log_path.exists():  # drop log rows of steps after the saved state: they will be redone
        rows = [r for r in read_jsonl(log_path) if r["step"] <= start]
        write_jsonl_atomic(log_path, rows)
    bar = tqdm(total=total, initial=start, desc=f"train iter {it}", unit="step", dynamic_ncols=True)
    with open(log_path, "a", encoding="utf-8") as flog:
        order = None
        for step in range(start, total):
            epoch, k = divmod(step, steps_per_epoch)
            if order is None or k == 0:  # one order per epoch (also rebuilt when resuming mid-epoch)
                order = step_order(units, cfg["seed"] * 1_000_003 + it * 1000 + epoch)
            seqs = [s for u in order[k * upg:(k + 1) * upg] for s in units[u]]
            prepare_step(seqs, cfg)
            t0, ntok = time.time(), sum(len(s["ids"]) - s["n_prompt"] for s in seqs)
            opt.zero_grad(set_to_none=True)
            loss, metrics = 0.0, {}
            mbs = micro_batches(seqs, budget, unit)
            for mb in mbs:
                if cfg["loss"] == "scoredpo":
                    mb[0]["pair_share"] = (len(mb) / 2) / (len(seqs) / 2)
                l, m = step_loss(mdl, mb, cfg)
                loss += l
                for key, v in m.items():
                    metrics[key] = metrics.get(key, 0.0) + v
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
            opt.step()
            row = {"step": step + 1, "epoch": epoch, "loss": loss, "pg": metrics.get("pg"), "kl": metrics.get("kl"),
                   "clip_frac": metrics.get("clip_frac"), "ratio": metrics["ratio_mean"] / metrics["weight"] if metrics else None,
                   "grad_norm": gnorm, "lr": cfg["lr"],
                   "tokens_per_s": ntok / max(time.time() - t0, 1e-9)}
            if (step + 1) % cfg["save_every"] == 0 or step + 1 == total:
                torch.save({"lora": [p.detach().cpu() for p in params], "opt": opt.state_dict(), "step": step + 1},
                           str(state_path) + ".tmp")
                os.replace(str(state_path) + ".tmp", state_path)
            append_jsonl(flog, row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", kl=f"{metrics.get('kl') or 0:.4f}",
                            clip=f"{metrics.get('clip_frac') or 0:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
    bar.close()
    for p in params:
        p.requires_grad_(False)
    lora.save_adapter(mdl, out, base_model_name=cfg["model"])
    state_path.unlink(missing_ok=True)
    return {"steps": total, "sequences": len(flat)}


EVAL_KEYS = ("model", "bench", "data_dir", "eval_problems", "executor", "executor_model", "call_tokens", "max_calls",
             "max_new_tokens", "timeout", "runs")  # what makes two evaluations of one checkpoint the same
def reuse_data(run_dir, src, cfg):
    """--data-from: iteration 0's rollouts of another run (ablations on the same data), and its
    held-out rows of iteration 0 when the evaluation matches (iteration 0 is the base generator)."""
    if cfg["mode"] == "refine":
        raise DataError("--data-from reuses SPOGW rollouts; it does not apply to --mode refine")
    rows = Path(src) / "iter_0" / "rollouts.jsonl"
    read_jsonl(rows, required=curate.ROLLOUT_KEYS)  # validate before copying
    dst = run_dir / "iter_0" / "rollouts.jsonl"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dst, rows.read_text())
    src_cfg = read_json(Path(src) / "config.json", {})
    ev_src, ev_dst = Path(src) / "eval" / "iter_0.jsonl", run_dir / "eval" / "iter_0.jsonl"
    if ev_src.is_file() and not ev_dst.exists() and all(src_cfg.get(k) == cfg[k] for k in EVAL_KEYS):
        ev_dst.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(ev_dst, ev_src.read_text())


def baselines(run_dir, cfg, ex):
    """The fixed baselines listed in --baselines, run (or resumed) on the held-out problems; the
    others of the family are shown too when rows for the same problems and executor exist."""
    rows = {}
    offered = workflow.BASELINES[benchmarks.family(cfg["bench"])]
    wanted = [b for b in cfg["baselines"].split(",") if b in offered]
    for name in offered:
        out = report.baseline_path(cfg, name, "test", cfg["eval_problems"], run_dir.parent)
        if name in wanted:
            rows[name] = evaluate.eval_baseline(name, cfg, ex, "test", cfg["eval_problems"], out)
            print(f"[baseline {name}] accuracy {rows[name]['accuracy']:.3f}")
        elif out.is_file() and len(read_jsonl(out)) >= cfg["eval_problems"]:
            rows[name] = report.summarize(read_jsonl(out)[:cfg["eval_problems"]])
    return rows


def run(args):
    """The driver, one loop for both modes: per iteration collect -> curate -> update (each skipped
    when its output exists), then the held-out evaluation of the checkpoints and the report."""
    t_start = time.time()
    run_dir = Path(args.run)
    if args.iter < 0:
        raise DataError(f"--iter must be >= 0, got {args.iter}")
    if args.mode == "refine" and args.loss is None:
        args.loss = "rwr"  # W4S rewards are not advantages
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.merge(run_dir, args, smoke=args.smoke, save=True, tag="train")
    refining = cfg["mode"] == "refine"
    if refining and cfg["loss"] != "rwr":
        raise DataError(f"--mode refine trains with --loss rwr (W4S rewards are not advantages), got {cfg['loss']!r}")
    if args.data_from:
        reuse_data(run_dir, args.data_from, cfg)
    data = "refine.jsonl" if refining else "rollouts.jsonl"
    resumed = (run_dir / "iter_0" / data).exists() and not args.data_from
    print(f"[train] run {run_dir}  config: " + json.dumps(cfg, sort_keys=True))
    for line in config.run_notes(cfg, args.iter):
        print(f"[train] {line}", file=sys.stderr if line.startswith("warning") else sys.stdout)
    torch.manual_seed(cfg["seed"])
    rollout.set_threads(cfg)
    evals, baseline_rows = [], {}
    with rollout.open_executor(cfg) as ex:
        mdl, tok = model.load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
        lora.add_lora(mdl, r=cfg["lora_r"], alpha=cfg["lora_alpha"])
        ref = rollout.cost_reference(run_dir, cfg, ex) if cfg["cost_weight"] and not refining else None
        for k in range(args.iter):
            d = run_dir / f"iter_{k}"
            if k > 0:
                lora.load_adapter(mdl, d / "adapter")  # pi_old of iteration k
            if ("refine" if refining else "collect") not in read_json(d / "stats.json", {}) or not (d / data).is_file():
                step = refine.collect_refine if refining else collect.collect
                print(f"[collect {k}] " + json.dumps(step(run_dir, k, cfg, ex, loaded=(mdl, tok))))
            if not (d / "groups.jsonl").is_file():
                s = curate.refine_groups(run_dir, k) if refining else curate.run(run_dir, k, cfg, ref)
                print(f"[curate {k}] " + json.dumps(s))
            if not (run_dir / f"iter_{k + 1}" / "adapter").is_dir():
                t0 = time.time()
                s = update(run_dir, k, cfg, mdl, tok)
                update_json(d / "stats.json", "train", dict(s, seconds=time.time() - t0))
                print(f"[update {k}] " + json.dumps(s))
        if args.no_eval:
            return None
        (run_dir / "eval").mkdir(exist_ok=True)
        # W4S evaluates the meta-agent before and after training; SPOGW every checkpoint
        for k in sorted({0, args.iter}) if refining else range(args.iter + 1):
            if k > 0:
                lora.load_adapter(mdl, generator.adapter_dir(run_dir, k))
            with lora.lora_disabled(mdl) if k == 0 else contextlib.nullcontext():
                if refining:
                    sample = generator.sampler(cfg, run_dir, k, (mdl, tok), max_new_tokens=cfg["refine_tokens"])
                    s = refine.evaluate_refine(sample, cfg, ex, cfg["turns"], run_dir / "eval", f"refine_iter_{k}",
                                               cfg["eval_problems"])
                    print(f"[eval refine iter {k}] " + report.format_eval(s))
                    evals.append(s)
                else:
                    s = evaluate.eval_generator(mdl, tok, cfg, ex, run_dir / "eval" / f"iter_{k}.jsonl",
                                                limit=cfg["eval_problems"])
                    print(f"[eval iter {k}] accuracy {s['accuracy']:.3f} ({s['ci_low']:.3f}-{s['ci_high']:.3f})")
        if not refining:
            baseline_rows = baselines(run_dir, cfg, ex)
    return report.write(run_dir, cfg, args.iter, time.time() - t_start, resumed, baseline_rows, evals)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iter", type=int, default=3, help="iterations (collect -> curate -> update)")
    ap.add_argument("--run", default="runs/default", help="run directory (resumes what is there)")
    ap.add_argument("--smoke", action="store_true", help="the whole loop, tiny (CI)")
    ap.add_argument("--data-from", help="reuse iteration 0's rollouts of another run (ablations on the same data)")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation and report")
    config.add_knobs(ap, config.STEPS)
    args = ap.parse_args(argv)
    path = config.cli(lambda: run(args))
    if path is not None:
        print(path.read_text())


if __name__ == "__main__":
    main()
