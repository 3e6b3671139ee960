"""Every knob of a run in one table, the one function that merges them, and the one CLI error exit
(ARCHITECTURE §12).

    python train.py --help              # the knobs that matter first, then one group per step
    python -c "import config; print(config.defaults()['lr'])"

A run's knobs resolve as: KNOBS defaults < runs/<run>/config.json < --smoke (SMOKE) < explicit flags.
train.py saves the result back to config.json, so every later step (and a resumed run) sees the
same knobs; collect.py, curate.py and evaluate.py read it.
"""
import hashlib
import signal
import sys
import threading
import time
from pathlib import Path

from executor import DEFAULT_MODEL, ExecutorError
from jsonl import DataError, read_json, write_json_atomic
from sandbox import SandboxError

MAIN, MORE = True, False  # listed first in --help, or in its step's group

# name: (default, type or choices, step, shown first, one-line help). The step decides which entry
# points take the knob: collect.py and evaluate.py take "run", "collect" and "refine", curate.py
# "run" and "curate", headroom.py and router.py "collect" (router.py reads "eval" from --run's
# config.json), train.py all of them.
KNOBS = {
    # ---- the method
    "mode": ("spogw", ("spogw", "refine"), "run", MAIN,
             "spogw: per-problem workflows + GRPO; refine: W4S multi-turn refinement trained with RWR"),
    "bench": ("arith", str, "collect", MAIN, "arith | mixed | gsm8k | math | humaneval | mbpp | hotpotqa | drop"),
    "model": (DEFAULT_MODEL, str, "collect", MAIN, "generator: HF dir / hub id / .gguf / embedded name"),
    "problems": (10, int, "collect", MAIN, "training problems per iteration"),
    "prompt_kv": ("auto", ("auto", "shared", "repeat"), "collect", MORE,
                  "rows after one prompt (the update's completions, the local generator's samples) attend to its "
                  "keys/values held once (attention.py) or copied per row (transformers' SDPA: more memory and "
                  "time, the same math up to float rounding); auto: held once on a CPU, copied on CUDA (not "
                  "measured there yet)"),
    "draw": ("random", ("random", "kind"), "collect", MORE, "each iteration's training problems: a seeded subset, "
                                                          "or the kinds in turn (benchmarks with kinds: mixed)"),
    "m": (8, int, "collect", MAIN, "workflows sampled per problem"),
    "cost_weight": (0.0, float, "curate", MAIN, "lambda: score = correctness - lambda * executor tokens / the "
                                                "--cost-ref workflow's mean tokens per train problem (0 = accuracy only)"),
    "groups": ("sharpen", ("sharpen", "all", "random"), "curate", MAIN,
               "sharpen: top-t + bottom-t of the most varied subsets; all: every sample; random: random subsets"),
    # the names of losses.LOSSES, each a class in losses.py (a new loss adds its name here)
    "loss": ("grpo", ("grpo", "scoredpo", "rwr"), "update", MAIN, "grpo (SPOGW), scoredpo (ScoreFlow), rwr (W4S)"),
    "kl": ("masked", ("masked", "full", "none"), "update", MAIN, "where the KL applies (grpo): positive advantages only, all, nowhere"),
    "lr": (2e-4, float, "update", MAIN, "AdamW learning rate of the LoRA weights"),
    "seed": (0, int, "run", MAIN, "seeds problem subsets, sampling, curate's groups and the update order"),
    "executor": ("local", str, "collect", MAIN, "'local' (embedded server), 'none', or an OpenAI-compatible URL"),
    "executor_model": (None, str, "collect", MAIN, "model name at the executor endpoint"),
    "device": ("cpu", str, "collect", MAIN, "cpu | cuda"),
    # ---- collect: sampling workflows and running them
    "data_dir": (None, str, "collect", MORE, "benchmark data dir (default $SPOGW_DATA or ./data)"),
    "runs": (1, int, "collect", MORE, "executions per workflow (score = mean)"),
    "guides": ("none", ("none", "fewshot"), "collect", MAIN, "fewshot: the prompt's few-shot workflows also run on "
                                                            "every training problem and join its group as off-policy members"),
    "temperature": (0.8, float, "collect", MORE, "generator sampling temperature"),
    "top_p": (0.95, float, "collect", MORE, "generator nucleus sampling mass"),
    "max_new_tokens": (128, int, "collect", MORE, "generator completion length"),
    "gen_batch": (4, int, "collect", MORE, "problems per generation chunk (fixed: it seeds the chunks)"),
    "max_calls": (6, int, "collect", MORE, "operator calls allowed per workflow (the prompt says so too)"),
    "timeout": (30.0, float, "collect", MORE, "seconds per workflow run"),
    "workers": (16, int, "collect", MORE, "sandboxes run concurrently"),
    "generator_url": (None, str, "collect", MORE, "sample workflows from a vLLM server instead (README: vLLM recipe)"),
    "generator_name": (None, str, "collect", MORE, "the base model's name at --generator-url (default: --model); "
                                                   "iterations >= 1 load their adapter under a name of their own"),
    "dtype": ("auto", ("auto", "fp32", "bf16", "fp16"), "collect", MORE,
              "generator weights and forward precision (auto: bf16 on CUDA, fp32 on CPU)"),
    "threads": (0, int, "collect", MORE, "torch CPU threads here (0 = auto: leave a core to the local executor)"),
    "servers": (0, int, "collect", MORE, "local executor: server processes (0 = auto: one per core, at most 4)"),
    "call_tokens": (0, int, "collect", MORE, "cap on each executor reply, in tokens (0 = auto: 160 for the local "
                                             "executor, the operators' own limits otherwise)"),
    "max_in_flight": (0, int, "collect", MORE, "executor requests at once across all sandboxes (API rate tiers; 0 = unbounded)"),
    "max_fail_frac": (0.5, float, "collect", MORE, "stop (exit 2) when more than this fraction of the last --fail-window "
                                                   "executor calls failed after retries (1 = never)"),
    "fail_window": (20, int, "collect", MORE, "executor calls that --max-fail-frac looks back on"),
    "executor_retries": (None, int, "collect", MORE, "retries of an executor call on 429 / 5xx / timeouts / connection "
                                                     "errors (default 5; local executor 2)"),
    "executor_backoff": (None, float, "collect", MORE, "seconds before the first retry, doubled each time (default 1)"),
    # ---- curate: rollouts -> groups
    "n": (6, int, "curate", MORE, "subset size drawn from the m samples"),
    "group_size": (4, int, "curate", MORE, "2t: top-t + bottom-t after sharpening"),
    "min_var": (0.01, float, "curate", MORE, "minimum score variance of a subset"),
    "max_combos": (1000, int, "curate", MORE, "subsets enumerated (or drawn) per problem"),
    "groups_per_problem": (4, int, "curate", MORE, "groups kept per problem"),
    "drop_invalid": (False, bool, "curate", MORE, "remove invalid workflows (default: keep them as 0s)"),
    "cost_ref": ("programmer_format", str, "curate", MORE, "fixed workflow whose mean executor tokens on the train "
                                                           "split are one unit of cost (--cost-weight)"),
    "cost_on": ("all", ("all", "correct"), "curate", MORE, "who pays lambda * cost: all (correctness - lambda * "
                                                         "cost) or correct (correctness * max(0, 1 - lambda * "
                                                         "cost): a wrong answer scores 0, however cheap)"),
    "std_floor": (None, float, "curate", MORE, "advantages divide by max(group std, this): 0 = plain std (GRPO), "
                                               "1 = mean-only for scores in [0, 1]; default 1 with --cost-weight > 0 "
                                               "(cost stays a tie-breaker), else 0 (README: per-query value)"),
    # ---- update: groups -> the next adapter
    "ref": ("old", ("old", "base"), "update", MORE, "pi_ref: the data's checkpoint or the base model"),
    "beta": (0.1, float, "update", MORE, "KL coefficient (grpo) / DPO temperature (scoredpo)"),
    "eps": (0.2, float, "update", MORE, "PPO clip range"),
    "agg": ("token", ("token", "seq"), "update", MORE, "token-mean or sequence-mean loss"),
    "epochs": (2, int, "update", MORE, "passes over the iteration's frozen groups"),
    "groups_per_step": (4, int, "update", MORE, "groups (grpo/rwr) or problems (scoredpo) per optimizer step"),
    "pairs_per_problem": (4, int, "update", MORE, "scoredpo pairs drawn per problem"),
    "tau": (0.4, float, "update", MORE, "rwr temperature"),
    "token_budget": (4096, int, "update", MORE, "tokens per micro-batch forward (distinct prompts + rows x longest completion)"),
    "grad_clip": (1.0, float, "update", MORE, "gradient norm clip"),
    "weight_decay": (0.0, float, "update", MORE, "AdamW weight decay"),
    "lora_r": (16, int, "update", MORE, "LoRA rank"),
    "lora_alpha": (32, int, "update", MORE, "LoRA alpha (scale alpha / r)"),
    "save_every": (10, int, "update", MORE, "optimizer steps between resumable train states"),
    "chunk_size": (0, int, "update", MORE, "rows per chunk of the fused LM-head kernels (0 = auto: <= 256 MB scratch)"),
    "checkpoint": ("on", ("on", "off", "auto"), "update", MORE,
                   "activation checkpointing per decoder layer: on (the update's activations, for ~a third more "
                   "update time on a CPU), off, or auto (on with CUDA only)"),
    # ---- evaluation and report (train.py)
    "eval_problems": (200, int, "eval", MORE, "held-out test problems"),
    # io and programmer by default: programmer is the strongest fixed workflow on arith and shares most
    # executor calls with generated workflows; others show up once `evaluate.py --baseline` has run them
    "baselines": ("io,programmer", str, "eval", MORE, "comma list of fixed baselines run for the report ('' for none)"),
    "log": ("none", ("none", "tb", "wandb"), "run", MORE, "mirror the run's numbers to TensorBoard (runs/<run>/tb) or "
                                                         "Weights & Biases (offline without an API key); tracking.py"),
    # ---- refine (--mode refine)
    "turns": (3, int, "refine", MORE, "refinement turns per episode"),
    "candidates": (5, int, "refine", MORE, "meta-agent actions sampled per turn"),
    "val_problems": (16, int, "refine", MORE, "validation problems that score a workflow"),
    "episodes": (2, int, "refine", MORE, "episodes per iteration (each on its own validation batch)"),
    "max_repairs": (3, int, "refine", MORE, "re-prompts with the error before a candidate is skipped"),
    "refine_tokens": (160, int, "refine", MORE, "meta-agent completion length"),
    "eval_candidates": (5, int, "refine", MORE, "actions per turn at evaluation (1 = greedy)"),
}
ALIASES = {"executor": ["--executor-url"]}  # extra spellings of a flag
# --smoke: the whole loop, tiny (CI, ~2 min on 2 cores)
SMOKE = dict(problems=2, m=4, n=3, group_size=2, groups_per_problem=2, max_new_tokens=96, epochs=1,
             eval_problems=4, baselines="io", timeout=20.0, gen_batch=2,
             turns=1, candidates=2, val_problems=4, episodes=1, max_repairs=1, refine_tokens=96, eval_candidates=2)
# knobs that must be positive integers (max_repairs may be 0)
POSITIVE = ("problems", "m", "runs", "gen_batch", "workers", "n", "group_size", "epochs", "groups_per_step",
            "token_budget", "lora_r", "eval_problems", "turns", "candidates", "val_problems", "episodes",
            "refine_tokens", "eval_candidates")
STEPS = ("run", "collect", "curate", "update", "eval", "refine")


def seed_of(*parts):
    """Every random draw's seed: a 32-bit hash of --seed and the draw's name and indices, e.g.
    seed_of(cfg["seed"], "order", it, epoch). The same parts give the same seed in every process (a
    resumed step redraws what it drew before); different names never share a stream."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def defaults(steps=STEPS):
    return {k: v[0] for k, v in KNOBS.items() if v[2] in steps}


def add_knobs(ap, steps):
    """One flag per knob of `steps`, default None (= not given, so config.json can fill it): the
    main knobs first, then one argparse group per step."""
    groups = {"main": ap.add_argument_group("main knobs")}
    for s in steps:
        groups[s] = ap.add_argument_group(f"{s} knobs")
    for name, (default, kind, step, main, text) in KNOBS.items():
        if step not in steps:
            continue
        g = groups["main" if main else step]
        flags = ["--" + name.replace("_", "-")] + ALIASES.get(name, [])
        text = f"{text} (default {default!r})"
        if kind is bool:
            g.add_argument(*flags, dest=name, action="store_true", default=None, help=text)
        elif isinstance(kind, tuple):
            g.add_argument(*flags, dest=name, choices=kind, default=None, help=text)
        else:
            g.add_argument(*flags, dest=name, type=kind, default=None, help=text)


def merge(run_dir, args, steps=STEPS, smoke=False, save=False, tag="config"):
    """The knobs of `steps`: defaults < <run_dir>/config.json < SMOKE (if smoke) < flags given in
    `args`. Checks them; with save, writes the result back to config.json (and says which saved
    values the flags changed)."""
    cfg = defaults(steps)
    path = Path(run_dir) / "config.json" if run_dir else None
    saved = read_json(path, {}) if path else {}
    if not isinstance(saved, dict):
        raise DataError(f"{path}: expected a JSON object")
    cfg.update({k: v for k, v in saved.items() if k in cfg})
    if smoke:
        cfg.update({k: v for k, v in SMOKE.items() if k in cfg})
    given = {k: v for k, v in vars(args).items() if k in cfg and v is not None}
    changed = {k: (saved[k], v) for k, v in given.items() if k in saved and saved[k] != v}
    if save and changed:
        print(f"[{tag}] note: overriding {path} for {changed}", file=sys.stderr)
    cfg.update(given)
    check(cfg)
    if save:
        write_json_atomic(path, {**saved, **cfg})
    return cfg


def check(cfg):
    """Bad knob values fail here, naming the flag, before any work is done."""
    for k in POSITIVE:
        if k in cfg and (not isinstance(cfg[k], int) or cfg[k] < 1):
            raise DataError(f"--{k.replace('_', '-')} must be an integer >= 1, got {cfg[k]!r}")
    if "max_repairs" in cfg and (not isinstance(cfg["max_repairs"], int) or cfg["max_repairs"] < 0):
        raise DataError(f"--max-repairs must be an integer >= 0, got {cfg['max_repairs']!r}")
    for k, (_, kind, *_) in KNOBS.items():  # choices that came from config.json, not a flag argparse checked
        if isinstance(kind, tuple) and k in cfg and cfg[k] not in kind:
            raise DataError(f"--{k.replace('_', '-')} must be one of {', '.join(kind)}, got {cfg[k]!r}")
    for k, lo, hi in (("cost_weight", 0, None), ("std_floor", 0, None), ("max_in_flight", 0, None), ("max_fail_frac", 0, 1), ("fail_window", 1, None),
                      ("executor_retries", 0, None), ("executor_backoff", 0, None)):
        v = cfg.get(k)
        if v is not None and (v < lo or (hi is not None and v > hi)):
            raise DataError(f"--{k.replace('_', '-')} must be {'between %g and %g' % (lo, hi) if hi else '>= %g' % lo}, got {v}")


def cli(main):
    """Run an entry point's body: bad input (a file, a flag, a model, an endpoint that refuses)
    prints `error: ...` and exits 2; what was written before stays. Never a workflow's error:
    those are scores. SIGTERM stops it like Ctrl-C: the running sandboxes and local servers end
    within seconds, every row written stays, and the same command resumes (exit 143 / 130)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))  # unwinds, unlike a plain kill
    try:
        return main()
    except KeyboardInterrupt:
        print("stopped: the rows written so far are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except (DataError, ValueError, ExecutorError, SandboxError) as e:  # SandboxError: no sandbox can start here
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def std_floor(cfg):
    """The run's --std-floor: as given, else 1 when a cost weight is set and 0 otherwise. With cost in
    the score, a group whose workflows are all right (or all wrong) differs by cost alone, a spread
    of ~lambda * 0.1-1; divided by that small std it becomes +-1 advantages, as large as a right
    answer's over a wrong one, and the cheapest failure is pushed up (README: the collapsed seeds).
    A floor of 1 keeps such advantages at their size."""
    floor = cfg.get("std_floor")
    return floor if floor is not None else (1.0 if cfg.get("cost_weight") else 0.0)


def call_tokens(cfg):
    """The per-reply token cap of this run (None = none). The embedded 135M executor on a CPU makes
    ~40 tokens/s and, once it has not answered in ~150 tokens, mostly loops: capping it at 160 keeps
    runs short without changing what it gets right. Real executors keep the operators' limits."""
    n = cfg.get("call_tokens") or (160 if cfg.get("executor") == "local" else 0)
    return n or None


# Per-unit costs on 2 CPU cores with the embedded generator and executor (two executor servers),
# measured on the default run `python train.py --iter 3` alone on 2 cores of an AMD EPYC at c6ac463
# (README: 24.1 min in all, warm executor cache): collection 1.15 s per sampled workflow (sampling +
# execution), an update 10.0 s per training problem (2 to 3 in 10 were kept, 2 epochs, checkpointed),
# 0.72 s per held-out workflow (checkpoints and baselines; the executor cache serves calls that earlier
# checkpoints already made). Start-up, curate and the reports (~10 s) are left out.
SEC_PER_WORKFLOW, SEC_TRAIN_PER_PROBLEM, SEC_PER_EVAL = 1.15, 10.0, 0.72
# That machine's fp32 matmul [512 x 576] @ [576 x 1536] (the generator's sizes) on one thread, as that
# run's own start-up timed it (`[train] estimated time`'s calibration; bench.py loop's reference matmul).
# run_notes times the same matmul here and scales the estimate by the ratio: an AVX2-only core, or one
# shared with other work, takes longer.
REF_MATMUL_FLOP_S = 101e9


def estimate_minutes(cfg, iters):
    per_iter = cfg["problems"] * (cfg["m"] * cfg["runs"] * SEC_PER_WORKFLOW + cfg["epochs"] / 2 * SEC_TRAIN_PER_PROBLEM)
    n_eval = iters + 1 + len([b for b in cfg["baselines"].split(",") if b])
    return (iters * per_iter + n_eval * cfg["eval_problems"] * SEC_PER_EVAL) / 60


def matmul_peak(H=576, I=1536, M=512, reps=5, min_s=0.05):
    """FLOP/s of an fp32 [M x H] @ [H x I] matmul at torch's thread count: best of `reps` timed loops."""
    import torch
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, H, generator=g), torch.randn(H, I, generator=g)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < min_s or n == 0:
            a @ b
            n += 1
        best = min(best, dt / n)
    return {"shape": [M, H, I], "reps": reps, "flop_per_s": 2 * M * H * I / best}


def one_thread_matmul():
    """This machine's REF_MATMUL_FLOP_S (~0.3 s): the same matmul on one torch thread."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_peak()["flop_per_s"]
    finally:
        torch.set_num_threads(threads)


def run_notes(cfg, iters, here=None):
    """What to tell the user before a run starts: a time estimate where we have measured one (the
    embedded default on a CPU), scaled to this machine by a short matmul calibration (`here`: its
    FLOP/s, measured when None), and warnings for settings that waste the machine."""
    import torch  # here, not at the top: only train.py's start asks, and every CLI parses its flags here
    notes = []
    if cfg["device"] == "cpu" and torch.cuda.is_available():
        notes.append("warning: CUDA is available but --device is cpu: pass --device cuda to train and sample on the GPU")
    if cfg["device"] == "cpu" and cfg["model"] == DEFAULT_MODEL and cfg["executor"] == "local" \
            and cfg["mode"] == "spogw" and cfg["bench"] == "arith":
        here = here or one_thread_matmul()
        notes.append(f"estimated time: ~{estimate_minutes(cfg, iters) * REF_MATMUL_FLOP_S / here:.0f} min on 2 CPU "
                     f"cores like these (measured on 2 AMD EPYC cores, scaled by a matmul on one of this machine's "
                     f"cores: {here / 1e9:.0f} against {REF_MATMUL_FLOP_S / 1e9:.0f} GFLOP/s; more cores or a GPU "
                     f"take less)")
    else:
        notes.append("no time estimate: the per-unit costs were measured for the embedded model on arith on 2 CPU "
                     "cores only (other benchmarks' workflows cost differently); "
                     "the progress bars show the rate once it runs")
    return notes
