"""Train: the --iter driver (collect -> curate -> update, then evaluate and report) and the update step.

    python train.py --iter 3                                      # the default run: arith, embedded models, CPU
    python train.py --iter 1 --smoke --run runs/smoke             # the whole loop, tiny (~2 min on 2 cores)
    python train.py --iter 3 --loss scoredpo --run runs/sdpo      # ScoreFlow's Score-DPO on the same loop
    python train.py --iter 2 --mode refine --run runs/w4s         # W4S refinement, trained with RWR
    python train.py --iter 3 --run runs/kl-full --kl full --data-from runs/default   # an ablation on the same data

Iteration k: collect.py fills iter_k/rollouts.jsonl (refine.py: refine.jsonl), curate.py writes
iter_k/groups.jsonl, update() trains the LoRA on them into iter_{k+1}/adapter (ARCHITECTURE §1). A
step whose output exists is skipped, so a killed run resumes. pi_old and pi_ref are scored on the
loss's own micro-batches and precision (ARCHITECTURE §7, "One numeric path"): at the first step pi_theta / pi_old = 1.
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

import attention
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
import tracking
import workflow
from jsonl import (DataError, append_jsonl, read_json, read_jsonl, truncate_torn_tail, update_json, write_atomic,
                   write_jsonl_atomic)

GROUP_KEYS = ("problem_id", "prompt", "members")


def checkpointing(checkpoint, device):
    """Activation checkpointing on? `checkpoint` is the --checkpoint knob; auto: on a GPU, where
    activations, not time, bound a 7B step (the activations of every layer are kept for the backward
    without it); off on a CPU, where the 135M default fits easily and the recomputation would only
    cost time."""
    return torch.device(device).type == "cuda" if checkpoint == "auto" else checkpoint == "on"


def sequences(groups, tok, loss, seed):
    """The training examples of one iteration: loss.units (a list of units, each a list of
    sequences) with each member's token ids. A sequence's prompt is the token ids its sampler saw
    (the member's or the group's `prompt_ids`); groups of runs that did not store them are
    re-rendered from the messages."""

    rendered = {}

    def seq(g, m):
        ids = m.get("prompt_ids") or g.get("prompt_ids")
        if not ids:  # rendered once per group, as before prompt ids were stored
            if id(g) not in rendered:
                rendered[id(g)] = sampling.prompt_ids(tok, g["prompt"], g.get("prefill") or None)
            ids = rendered[id(g)]
        return {"ids": list(ids) + m["completion_ids"], "n_prompt": len(ids)}

    return loss.units(groups, seq, seed)


def micro_batches(seqs, budget, unit=1):
    """Consecutive runs of sequences whose forward stays within `budget` tokens, counted as the
    forward runs them (forward_hidden): each distinct prompt once, plus rows x longest completion.
    Cuts fall only between runs of `unit` sequences (the loss's unit: with Score-DPO's 2 a pair is
    never split; a single pair over the budget still goes alone)."""
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


def step_loss(mdl, mb, loss, ckpt=False):
    """Forward and backward one micro-batch; every sequence carries what loss.prepare computed over
    the whole step, so micro-batch losses add up to the step's loss. Returns (loss, metrics)."""
    h, W, y = forward_hidden(mdl, mb, ckpt)
    value, metrics = loss.loss(h, W, y, mb)
    value.backward()
    return value.item(), metrics


def backward_step(mdl, seqs, loss, budget, ckpt=False):
    """The gradient of one optimizer step, accumulated micro-batch by micro-batch into the LoRA
    parameters (the caller zeroes them before and steps the optimizer after). The sequences carry
    pi_old and pi_ref (score_old_and_ref). Returns (the step's loss, its metrics summed)."""
    loss.prepare(seqs)
    total, metrics = 0.0, {}
    for mb in micro_batches(seqs, budget, loss.unit):
        value, m = step_loss(mdl, mb, loss, ckpt)
        total += value
        for key, v in m.items():
            metrics[key] = metrics.get(key, 0.0) + v
    return total, metrics


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


def epoch_order(units, seed, it, epoch):
    """The order of the units in one epoch of iteration `it` of a run seeded `seed` (--seed): the
    pi_old pass and epoch 0 both ask here, so each sequence is scored in the micro-batch its first
    update step runs."""
    return step_order(units, config.seed_of(seed, "order", it, epoch))


def step_seqs(units, order, k, per_step):
    """The sequences of step k of an epoch: its `per_step` units in `order`."""
    return [s for u in order[k * per_step:(k + 1) * per_step] for s in units[u]]


def score_old_and_ref(mdl, steps, loss, cfg, ckpt=False):
    """pi_old (and pi_ref) of every sequence, once, before the first update and without gradient,
    step by step (`steps`: epoch 0's steps' sequences), on the loss's micro-batches."""
    budget, chunk = cfg["token_budget"], cfg["chunk_size"]
    for seqs in steps:
        olds = seq_logprobs(mdl, seqs, budget, chunk, loss.unit, ckpt)
        if loss.base_ref or cfg["ref"] == "base":
            with lora.lora_disabled(mdl):
                refs = seq_logprobs(mdl, seqs, budget, chunk, loss.unit, ckpt)
        else:
            refs = olds
        for s, o, r in zip(seqs, olds, refs):
            s["old"], s["ref"], s["ref_sum"] = o, r, sum(r)


def resume(state_path, log_path, params, opt):
    """The step to start from: 0, or the saved train state's (weights and optimizer restored). Log
    rows of later steps are dropped: those steps will be redone."""
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for p, v in zip(params, state["lora"]):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
        start = state["step"]
    truncate_torn_tail(log_path)
    if log_path.exists():
        write_jsonl_atomic(log_path, [r for r in read_jsonl(log_path) if r["step"] <= start])
    return start


def save_state(state_path, params, opt, step):
    """What resume needs to continue after `step`, written atomically."""
    torch.save({"lora": [p.detach().cpu() for p in params], "opt": opt.state_dict(), "step": step},
               str(state_path) + ".tmp")
    os.replace(str(state_path) + ".tmp", state_path)


LOG_FIELDS = ("pg", "kl", "clip_frac", "ratio")  # every train_log row has them (null where a loss has none)


def log_row(step, epoch, value, summary, grad_norm, lr, tokens, seconds):
    """One train_log.jsonl row; the loss's summary fills LOG_FIELDS (report.py plots kl, clip_frac)
    and may add fields of its own."""
    return {"step": step, "epoch": epoch, "loss": value, **dict.fromkeys(LOG_FIELDS), **summary,
            "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tokens / max(seconds, 1e-9)}


def update(run_dir, it, cfg, mdl, tok):
    """One SPOGW update on iter_<it>/groups.jsonl -> iter_<it+1>/adapter, with the loss cfg["loss"]
    names. `mdl` carries the LoRA of iteration `it` (pi_old); it is trained in place. Resumes from
    iter_<it>/train_state.pt."""
    iter_dir = Path(run_dir) / f"iter_{it}"
    loss = losses.make(cfg)
    units = sequences(read_jsonl(iter_dir / "groups.jsonl", required=GROUP_KEYS), tok, loss,
                      seed=config.seed_of(cfg["seed"], "units", it))
    per_step, ckpt = max(1, cfg["groups_per_step"]), checkpointing(cfg["checkpoint"], next(mdl.parameters()).device)
    steps_per_epoch = math.ceil(len(units) / per_step)
    total = steps_per_epoch * cfg["epochs"]
    mdl.eval()  # no dropout: pi_theta == pi_old exactly at the first step
    first = epoch_order(units, cfg["seed"], it, 0)
    score_old_and_ref(mdl, [step_seqs(units, first, k, per_step) for k in range(steps_per_epoch)], loss, cfg, ckpt)
    params = lora.lora_parameters(mdl)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    state_path, log_path = iter_dir / "train_state.pt", iter_dir / "train_log.jsonl"
    start = resume(state_path, log_path, params, opt)
    bar = tqdm(total=total, initial=start, desc=f"train iter {it}", unit="step", dynamic_ncols=True)
    with open(log_path, "a", encoding="utf-8") as flog:
        order = None
        for step in range(start, total):
            epoch, k = divmod(step, steps_per_epoch)
            if order is None or k == 0:  # one order per epoch (also rebuilt when resuming mid-epoch)
                order = epoch_order(units, cfg["seed"], it, epoch)
            seqs = step_seqs(units, order, k, per_step)
            t0 = time.time()
            opt.zero_grad(set_to_none=True)
            value, metrics = backward_step(mdl, seqs, loss, cfg["token_budget"], ckpt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
            opt.step()
            row = log_row(step + 1, epoch, value, loss.summary(metrics), grad_norm, cfg["lr"],
                          sum(len(s["ids"]) - s["n_prompt"] for s in seqs), time.time() - t0)
            if (step + 1) % cfg["save_every"] == 0 or step + 1 == total:
                save_state(state_path, params, opt, step + 1)
            append_jsonl(flog, row)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", kl=f"{row['kl'] or 0:.4f}", clip=f"{row['clip_frac'] or 0:.2f}",
                            tok_s=f"{row['tokens_per_s']:.0f}")
    bar.close()
    for p in params:
        p.requires_grad_(False)
    lora.save_adapter(mdl, iter_dir.parent / f"iter_{it + 1}" / "adapter", base_model_name=cfg["model"])
    state_path.unlink(missing_ok=True)
    return {"steps": total, "sequences": sum(map(len, units))}


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


def iteration(run_dir, k, cfg, mdl, tok, ex, ref):
    """Iteration k: collect (W4S: refinement episodes) -> curate -> update, each skipped when its
    output exists, so a killed run resumes. `mdl` holds pi_old (iteration k's LoRA). Returns the
    phases run now (the tracker mirrors those)."""
    iter_dir, refining, ran = run_dir / f"iter_{k}", cfg["mode"] == "refine", []
    data = iter_dir / ("refine.jsonl" if refining else "rollouts.jsonl")
    if ("refine" if refining else "collect") not in read_json(iter_dir / "stats.json", {}) or not data.is_file():
        step = refine.collect_refine if refining else collect.collect
        print(f"[collect {k}] " + json.dumps(step(run_dir, k, cfg, ex, loaded=(mdl, tok))))
        ran.append("refine" if refining else "collect")
        model.release_freed_memory()  # the decode caches, before the update's activations
    if not (iter_dir / "groups.jsonl").is_file():
        s = curate.refine_groups(run_dir, k) if refining else curate.run(run_dir, k, cfg, ref)
        print(f"[curate {k}] " + json.dumps(s))
        ran.append("curate")
    if not (run_dir / f"iter_{k + 1}" / "adapter").is_dir():
        t0 = time.time()
        s = update(run_dir, k, cfg, mdl, tok)
        update_json(iter_dir / "stats.json", "train", dict(s, seconds=time.time() - t0))
        print(f"[update {k}] " + json.dumps(s))
        ran.append("train")
        model.release_freed_memory()  # the activations, before the next collect
    return ran


def evaluate_checkpoints(run_dir, cfg, iters, mdl, tok, ex, tracker):
    """The held-out evaluation: SPOGW every checkpoint 0..iters (rows in eval/iter_<k>.jsonl), W4S its
    meta-agent before and after training. Returns the refine summaries (report.write shows them)."""
    (run_dir / "eval").mkdir(exist_ok=True)
    refining, evals = cfg["mode"] == "refine", []
    for k in sorted({0, iters}) if refining else range(iters + 1):
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
        tracker.evaluation(k, s)
        model.release_freed_memory()
    return evals


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
    resumed = (run_dir / "iter_0" / ("refine.jsonl" if refining else "rollouts.jsonl")).exists() and not args.data_from
    print(f"[train] run {run_dir}  config: " + json.dumps(cfg, sort_keys=True))
    for line in config.run_notes(cfg, args.iter):
        print(f"[train] {line}", file=sys.stderr if line.startswith("warning") else sys.stdout)
    torch.manual_seed(cfg["seed"])
    rollout.set_threads(cfg["threads"], cfg["executor"])
    baseline_rows = {}
    # the tracker opens first: a missing tensorboard / wandb fails now, not after an hour of collecting
    with contextlib.closing(tracking.open_tracker(run_dir, cfg)) as tracker, rollout.open_executor(cfg) as ex:
        mdl, tok = model.load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
        lora.add_lora(mdl, r=cfg["lora_r"], alpha=cfg["lora_alpha"])
        attention.use(mdl, cfg["prompt_kv"])  # "shared": the decode's and the update's shared-prompt attention
        ref = rollout.cost_reference(run_dir, cfg, ex) if cfg["cost_weight"] and not refining else None
        for k in range(args.iter):
            if k > 0:
                lora.load_adapter(mdl, run_dir / f"iter_{k}" / "adapter")  # pi_old of iteration k
            tracker.iteration(run_dir, k, iteration(run_dir, k, cfg, mdl, tok, ex, ref))
        if args.no_eval:
            return None
        evals = evaluate_checkpoints(run_dir, cfg, args.iter, mdl, tok, ex, tracker)
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
