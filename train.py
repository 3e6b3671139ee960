"""SPOGW update step and the --iter driver.

    python train.py --iter 3
"""

# ==== update loop and driver ====

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import model as M
from jsonl import (DataError, append_jsonl, read_json, read_jsonl, truncate_torn_tail, update_json, write_atomic,
                   write_json_atomic, write_jsonl_atomic)

GROUP_KEYS = ("problem_id", "prompt", "members")
TRAIN_DEFAULTS = dict(loss="grpo", kl="masked", ref="old", beta=0.1, eps=0.2, agg="token", lr=2e-4,
                      epochs=2, groups_per_step=4, pairs_per_problem=4, tau=0.4, token_budget=4096,
                      grad_clip=1.0, lora_r=16, lora_alpha=32, weight_decay=0.0, save_every=10, chunk_size=0,
                      checkpoint="auto")


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
    import model as M

    rendered = {}

    def prompt_of(g, m):
        ids = m.get("prompt_ids") or g.get("prompt_ids")
        if not ids:  # rendered once per group, as before prompt ids were stored
            if id(g) not in rendered:
                rendered[id(g)] = M.prompt_ids(tok, g["prompt"], g.get("prefill") or None)
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
        pairs = sample_pairs([m["score"] for _, m in ms], pairs_per_problem, seed + k)
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


def forward_hidden(model, mb, ckpt=False):
    """(hidden [N, H], weight, targets [N]) of the completion tokens of a micro-batch, sequences in
    order. Sequences with the same prompt (a group, a problem's pairs) share one prompt forward, and a
    workflow that sits in several groups runs once: its rows are repeated, so its gradient adds up.
    This is the one forward of the update: pi_old, pi_ref and pi_theta all go through it, in the
    model's precision (M.precision) and on the same micro-batches, so that at the first step of an
    iteration pi_theta == pi_old holds bit for bit (rho = 1, KL = 0), in bf16 too."""
    by_prompt = {}
    for i, s in enumerate(mb):
        comps = by_prompt.setdefault(tuple(s["ids"][:s["n_prompt"]]), {})
        comps.setdefault(tuple(s["ids"][s["n_prompt"]:]), []).append(i)
    rows, W = [None] * len(mb), None
    with M.precision(model), M.checkpointed(model, ckpt):
        for prompt, comps in by_prompt.items():
            h, W, y = M.shared_prompt_hidden(model, list(prompt), [list(c) for c in comps])
            off = 0
            for c, idx in comps.items():
                for i in idx:
                    rows[i] = (h[off:off + len(c)], y[off:off + len(c)])
                off += len(c)
    # the LM head runs in the weights' dtype (the fused kernels keep their softmax math in fp32)
    return torch.cat([r[0] for r in rows]).to(W.dtype), W, torch.cat([r[1] for r in rows])


@torch.no_grad()
def seq_logprobs(model, seqs, budget, chunk_size, unit=1, ckpt=False):
    """Per-sequence lists of completion-token log-probs (no grad): pi_old / pi_ref. Called with one
    step's sequences, it cuts the same micro-batches as that step's update (micro_batches is a pure
    function of the sequences), so both see the same batch shapes and hence the same arithmetic."""
    out = []
    for mb in micro_batches(seqs, budget, unit):
        h, W, y = forward_hidden(model, mb, ckpt)
        lp = M.fused_logprobs(h, W, y, chunk_size).cpu()
        out.extend(t.tolist() for t in lp.split([len(s["ids"]) - s["n_prompt"] for s in mb]))
    return out


def step_loss(model, mb, cfg):
    """Backward one micro-batch; every sequence carries its precomputed token weight / coefficients
    (set by `update` over the whole step) so micro-batches add up to the full-step loss."""
    device = next(model.parameters()).device
    cat = lambda key: torch.tensor([x for s in mb for x in s[key]], device=device)
    h, W, y = forward_hidden(model, mb, checkpointing(cfg, device))
    if cfg["loss"] == "grpo":
        loss, m = M.fused_grpo_loss(h, W, y, cat("old"), cat("ref"), cat("adv_t"), cat("w_t"), cat("km_t"),
                                    cfg["beta"], cfg["eps"], cfg["chunk_size"])
        loss.backward()
        return loss.item(), m
    logp = M.fused_logprobs(h, W, y, cfg["chunk_size"])
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
    loss = score_dpo_loss(sums[0::2], ref[0::2], sums[1::2], ref[1::2], sc[0::2], sc[1::2], cfg["beta"]) * mb[0]["pair_share"]
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
        w = token_weights(seg, len(seqs), cfg["agg"]).float()
        km = kl_token_mask(adv, seg, cfg["kl"])
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
    import model as M
    from tqdm import tqdm

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
            with M.lora_disabled(mdl):
                refs = seq_logprobs(mdl, seqs, budget, cs, unit, ckpt)
        else:
            refs = olds
        for s, o, r in zip(seqs, olds, refs):
            s["old"], s["ref"], s["ref_sum"] = o, r, sum(r)
    params = M.lora_parameters(mdl)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = steps_per_epoch * cfg["epochs"]
    state_path, log_path = d / "train_state.pt", d / "train_log.jsonl"
    start = 0
    if state_path.is_file():  # resume between steps: weights, optimizer and step count
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for p, v in zip(params, st["lora"]):
                p.copy_(v)
        opt.load_state_dict(st["opt"])
        start = st["step"]
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
    M.save_adapter(mdl, out, base_model_name=cfg["model"])
    state_path.unlink(missing_ok=True)
    return {"steps": total, "sequences": len(flat)}


def train_args(ap):
    g = ap.add_argument_group("update")
    g.add_argument("--loss", choices=["grpo", "scoredpo", "rwr"])
    g.add_argument("--kl", choices=["masked", "full", "none"], help="where the KL applies (grpo)")
    g.add_argument("--ref", choices=["old", "base"], help="pi_ref: the data's checkpoint or the base model")
    g.add_argument("--beta", type=float, help="KL coefficient (grpo) / DPO temperature (scoredpo)")
    g.add_argument("--eps", type=float, help="PPO clip range")
    g.add_argument("--agg", choices=["token", "seq"], help="token-mean or sequence-mean loss")
    g.add_argument("--lr", type=float)
    g.add_argument("--epochs", type=int, help="passes over the iteration's frozen groups")
    g.add_argument("--groups-per-step", type=int, help="groups (grpo/rwr) or problems (scoredpo) per optimizer step")
    g.add_argument("--pairs-per-problem", type=int, help="scoredpo pairs drawn per problem")
    g.add_argument("--tau", type=float, help="rwr temperature")
    g.add_argument("--token-budget", type=int, help="tokens per micro-batch forward (distinct prompts + rows x longest completion)")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=int)
    g.add_argument("--save-every", type=int, help="optimizer steps between resumable train states")
    g.add_argument("--checkpoint", choices=["auto", "on", "off"],
                   help="activation checkpointing per decoder layer (auto: on with CUDA, off on CPU)")


CURATE_DEFAULTS = dict(groups="sharpen", n=6, group_size=4, min_var=0.01, max_combos=1000, groups_per_problem=4,
                       drop_invalid=False)
# io and programmer are run by default (programmer is the strongest on arith and shares most executor calls
# with generated workflows); the others show up in the report once `evaluate.py --baseline` has run them
EVAL_DEFAULTS = dict(eval_problems=200, baselines="io,programmer")
EVAL_KEYS = ("model", "bench", "data_dir", "eval_problems", "executor", "executor_model", "call_tokens", "max_calls",
             "max_new_tokens", "timeout", "runs")  # what makes two evaluations of one checkpoint the same
SMOKE = dict(problems=2, m=4, n=3, group_size=2, groups_per_problem=2, max_new_tokens=96, epochs=1,
             eval_problems=4, baselines="io", timeout=20.0, gen_batch=2)
# Per-unit costs on 2 CPU cores with the embedded generator and executor (two executor servers),
# measured on the default run (runs/default/report.md: 35.6 min in all): collection 2.8 s per sampled
# workflow (sampling + execution), an update ~5.8 s per training problem (1 to 3 in 10 are kept,
# 2 epochs), 1.1 s per held-out workflow (the executor cache serves calls that earlier checkpoints or
# baselines already made).
SEC_PER_WORKFLOW, SEC_TRAIN_PER_PROBLEM, SEC_PER_EVAL = 2.8, 5.8, 1.1


def config(run_dir, args):
    """Defaults < the run's config.json < --smoke < explicit flags; saved back to config.json."""
    import collect
    cfg = {**collect.DEFAULTS, **CURATE_DEFAULTS, **TRAIN_DEFAULTS, **EVAL_DEFAULTS}
    path = Path(run_dir) / "config.json"
    saved = read_json(path, {})
    cfg.update({k: v for k, v in saved.items() if k in cfg})
    if args.smoke:
        cfg.update(SMOKE)
    given = {k: v for k, v in vars(args).items() if k in cfg and v is not None and v is not False}
    if saved:
        changed = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
        if changed:
            print(f"[train] note: overriding {path} for {changed}", file=sys.stderr)
    cfg.update(given)
    write_json_atomic(path, cfg)
    return cfg


def estimate_minutes(cfg, iters):
    per_iter = cfg["problems"] * (cfg["m"] * cfg["runs"] * SEC_PER_WORKFLOW + cfg["epochs"] / 2 * SEC_TRAIN_PER_PROBLEM)
    n_eval = iters + 1 + len([b for b in cfg["baselines"].split(",") if b])
    return (iters * per_iter + n_eval * cfg["eval_problems"] * SEC_PER_EVAL) / 60


def run_notes(cfg, iters):
    """What to tell the user before a run starts: a time estimate where we have measured one (the
    embedded default on a CPU) and warnings for settings that waste the machine."""
    notes = []
    if cfg["device"] == "cpu" and torch.cuda.is_available():
        notes.append("warning: CUDA is available but --device is cpu: pass --device cuda to train and sample on the GPU")
    if cfg["device"] == "cpu" and cfg["model"] == M.DEFAULT_MODEL and cfg["executor"] == "local":
        notes.append(f"estimated time: ~{estimate_minutes(cfg, iters):.0f} min on 2 CPU cores (measured on the "
                     f"embedded default; more cores or a GPU take less)")
    else:
        notes.append("no time estimate: the per-unit costs were measured for the embedded model on 2 CPU cores only; "
                     "the progress bars show the rate once it runs")
    return notes


def write_report(run_dir, cfg, iters, baseline_rows, wall, resumed=False):
    import evaluate
    run_dir = Path(run_dir)
    lines = [f"# spogw report: {run_dir.name}", "",
             f"generator `{cfg['model']}`, executor `{cfg['executor']}`"
             f"{' / ' + cfg['executor_model'] if cfg['executor_model'] else ''}, benchmark `{cfg['bench']}`, "
             f"loss `{cfg['loss']}` (kl {cfg['kl']}, ref {cfg['ref']}, beta {cfg['beta']}), groups `{cfg['groups']}` "
             f"(m={cfg['m']}, n={cfg['n']}, 2t={cfg['group_size']}), {cfg['problems']} problems/iteration, "
             f"lr {cfg['lr']}, {cfg['epochs']} epochs. Wall time {wall / 60:.1f} min"
             f"{' (this invocation, which resumed an earlier one)' if resumed else ''}.", "",
             "| iteration | valid % (train) | mean train score | test accuracy (95 % CI) | test valid % | executor tokens (train+test) | $ | wall (collect+train) |",
             "|---|---|---|---|---|---|---|---|"]
    for k in range(iters + 1):
        st = read_json(run_dir / f"iter_{k}" / "stats.json", {})
        c = st.get("collect", {})
        ev = run_dir / "eval" / f"iter_{k}.jsonl"
        s = evaluate.summarize(read_jsonl(ev)) if ev.is_file() else None
        acc = f"{100 * s['accuracy']:.1f} ({100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f})" if s else "–"
        toks = c.get("executor_tokens", 0) + (s["executor_tokens"] if s else 0)
        cost = c.get("cost_usd", 0.0) + (s["cost_usd"] if s else 0.0)
        wall_k = c.get("seconds", 0.0) + st.get("train", {}).get("seconds", 0.0)
        lines.append(f"| {k} | {100 * c['valid_fraction']:.0f} | {c['mean_score']:.3f} | " if c else f"| {k} | – | – | ")
        lines[-1] += f"{acc} | {100 * s['valid']:.0f} | {toks} | {cost:.4f} | {wall_k / 60:.1f} min |" if s else f"{acc} | – | {toks} | {cost:.4f} | {wall_k / 60:.1f} min |"
    lines += ["", "Fixed baselines (same benchmark, split, problems and executor):", "",
              "| baseline | n | test accuracy (95 % CI) | executor tokens | $ |", "|---|---|---|---|---|"]
    for name, s in baseline_rows.items():
        lines.append(f"| {name} | {s['n']} | {100 * s['accuracy']:.1f} ({100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}) | "
                     f"{s['executor_tokens']} | {s['cost_usd']:.4f} |")
    lines += ["", "Curate figures per iteration (problems kept / groups / mean group std / median MIL):", ""]
    for k in range(iters):
        cu = read_json(run_dir / f"iter_{k}" / "stats.json", {}).get("curate", {})
        if cu:
            lines.append(f"- iter {k}: {cu['problems_kept']}/{cu['problems']} problems, {cu['groups']} groups, "
                         f"std {cu['mean_group_std']:.3f}, MIL {cu['median_mil']:.3f}")
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"


def main(argv=None):
    import benchmarks
    import collect
    import curate
    import evaluate
    import model as M

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iter", type=int, default=3, help="SPOGW iterations (collect -> curate -> update)")
    ap.add_argument("--run", default="runs/default", help="run directory (resumes what is there)")
    ap.add_argument("--smoke", action="store_true", help="the whole loop, tiny (CI)")
    ap.add_argument("--data-from", help="reuse iteration 0's rollouts of another run (ablations on the same data)")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation and report")
    ap.add_argument("--eval-problems", type=int, help="held-out test problems (default 200)")
    ap.add_argument("--baselines", help="comma list of fixed baselines to run for the report ('' for none; default "
                                        "io,programmer; other baselines already run for the same benchmark, split, "
                                        "problems and executor are shown too)")
    collect.add_args(ap)
    curate.add_args(ap)
    train_args(ap)
    # curate's argparse defaults would hide config.json values: treat them as "not given"
    ap.set_defaults(**{k: None for k in CURATE_DEFAULTS})
    ap.add_argument("--mode", choices=["spogw", "refine"], default="spogw",
                    help="refine: W4S multi-turn workflow refinement trained with RWR (refine.py)")
    import refine
    refine.add_args(ap)
    args = ap.parse_args(argv)
    if args.mode == "refine":
        return refine.train_main(args)
    t_start = time.time()
    run_dir = Path(args.run)
    try:
        if args.iter < 0:
            raise DataError(f"--iter must be >= 0, got {args.iter}")
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = config(run_dir, args)
        if args.data_from:
            src = Path(args.data_from) / "iter_0" / "rollouts.jsonl"
            read_jsonl(src, required=curate.ROLLOUT_KEYS)  # validate before copying
            dst = run_dir / "iter_0" / "rollouts.jsonl"
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(dst, src.read_text())
            # iteration 0 is the base generator: its held-out rows are the source's when the evaluation matches
            src_cfg = read_json(Path(args.data_from) / "config.json", {})
            ev_src, ev_dst = Path(args.data_from) / "eval" / "iter_0.jsonl", run_dir / "eval" / "iter_0.jsonl"
            if ev_src.is_file() and not ev_dst.exists() and all(src_cfg.get(k) == cfg[k] for k in EVAL_KEYS):
                ev_dst.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(ev_dst, ev_src.read_text())
        resumed = (run_dir / "iter_0" / "rollouts.jsonl").exists() and not args.data_from
        print(f"[train] run {run_dir}  config: " + json.dumps(cfg, sort_keys=True))
        for line in run_notes(cfg, args.iter):
            print(f"[train] {line}", file=sys.stderr if line.startswith("warning") else sys.stdout)
        torch.manual_seed(cfg["seed"])
        collect.set_threads(cfg)
        with collect.open_executor(cfg) as ex:
            mdl, tok = M.load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
            M.add_lora(mdl, r=cfg["lora_r"], alpha=cfg["lora_alpha"])
            for k in range(args.iter):
                d = run_dir / f"iter_{k}"
                if k > 0:
                    M.load_adapter(mdl, d / "adapter")  # pi_old of iteration k
                st = read_json(d / "stats.json", {})
                if "collect" not in st or not (d / "rollouts.jsonl").is_file():
                    s = collect.collect(run_dir, k, cfg, executor=ex, generator=(mdl, tok))
                    print(f"[collect {k}] " + json.dumps(s))
                if not (d / "groups.jsonl").is_file():
                    s = curate.run(run_dir, k, argparse.Namespace(**{a: cfg[a] for a in CURATE_DEFAULTS}))
                    print(f"[curate {k}] " + json.dumps(s))
                if not (run_dir / f"iter_{k + 1}" / "adapter").is_dir():
                    t0 = time.time()
                    s = update(run_dir, k, cfg, mdl, tok)
                    update_json(d / "stats.json", "train", dict(s, seconds=time.time() - t0))
                    print(f"[update {k}] " + json.dumps(s))
            if args.no_eval:
                return
            (run_dir / "eval").mkdir(exist_ok=True)
            for k in range(args.iter + 1):
                if k == 0:
                    with M.lora_disabled(mdl):
                        s = evaluate.eval_generator(mdl, tok, cfg, ex, run_dir / "eval" / "iter_0.jsonl",
                                                    limit=cfg["eval_problems"])
                else:
                    M.load_adapter(mdl, run_dir / f"iter_{k}" / "adapter")
                    s = evaluate.eval_generator(mdl, tok, cfg, ex, run_dir / "eval" / f"iter_{k}.jsonl",
                                                limit=cfg["eval_problems"])
                print(f"[eval iter {k}] accuracy {s['accuracy']:.3f} ({s['ci_low']:.3f}-{s['ci_high']:.3f})")
            baseline_rows = {}
            offered = evaluate.BASELINES[benchmarks.family(cfg["bench"])]
            wanted = [b for b in cfg["baselines"].split(",") if b in offered]
            for name in offered:  # the listed ones are run (or resumed); others are shown if already complete
                out = evaluate.baseline_path(cfg, name, "test", cfg["eval_problems"], run_dir.parent)
                if name in wanted:
                    baseline_rows[name] = evaluate.eval_baseline(name, cfg, ex, "test", cfg["eval_problems"], out)
                    print(f"[baseline {name}] accuracy {baseline_rows[name]['accuracy']:.3f}")
                elif out.is_file() and len(read_jsonl(out)) >= cfg["eval_problems"]:
                    baseline_rows[name] = evaluate.summarize(read_jsonl(out)[:cfg["eval_problems"]])
        path = write_report(run_dir, cfg, args.iter, baseline_rows, time.time() - t_start, resumed)
        print(path.read_text())
    except (DataError, ValueError, collect.ExecutorError) as e:  # here: the endpoint's, never a workflow's
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
