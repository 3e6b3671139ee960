"""Where the time of the embedded default loop goes: one row per phase of a small, real slice of it.

    python bench.py loop                          # arith, embedded generator + local executor, 2 problems x 8
    python bench.py loop --problems 4 --m 8 --eval-problems 4 --json
    python bench.py loop --quick                  # tiny random models, in-process stub executor (the test)

The slice is the loop's own code (ARCHITECTURE §1): collect.collect samples and runs m workflows per
problem, curate.run groups them, train.update trains the LoRA one iteration, evaluate.eval_generator
decodes and runs one greedy workflow per held-out problem. We time around it: rollout.pipelined is
swapped for a sequential loop (collect.py overlaps sampling with execution; here each gets its own
wall time), generator.sampler's sample(), train.seq_logprobs and train.step_loss are wrapped by name
to record their time and inputs, and a proxy times each executor call (no response cache here).
Without score variance curate keeps no group; then each problem's rollouts are grouped with
synthetic advantages (the update row says so), which changes no FLOP. Seconds per phase:
  generator decode  collect's sample() calls (prefill + decode of m workflows per problem)
  executor calls    collect's calls: wall time with at least one in flight (union of their intervals)
  sandbox           sum over collect's workflows of operators.run_workflow's `seconds` (spawn to result)
                    minus their executor calls' time (a workflow's calls run one at a time inside its
                    sandbox's handler): spawn, the workflow's Python, the sandboxes `programmer` runs,
                    teardown; summed over workflows that ran concurrently on --workers threads
  update fwd+bwd    train.update's step_loss calls;  pi_old pass: its seq_logprobs calls (no grad)
  evaluation        eval_generator in all: greedy decode + execution of the held-out problems
Peak RSS per row: this process's VmHWM, reset at the start of each step (proc(5): clear_refs 5) and
read at its end. Decode, executor calls and sandbox run inside collect.collect at once, so they share its
peak; update and π_old share train.update's; None ("-") where /proc/self/clear_refs can't be written
(not Linux). A line under the table gives each local executor server's peak over its whole life.
FLOPs are model FLOPs, counted per phase by flops.py (its docstring: the formulas and their sources).
share = FLOP/s / that of an fp32 torch matmul [512 x H] @ [H x I] (the generator's sizes) at this
process's thread count, best of --reps, in the same run; the local executor's servers run threads of
their own, so its share may pass 1.
"""
import contextlib
import os
import json
import string
import tempfile
import threading
import time
import types
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import attention
import bench_gpu
import collect
import config
import curate
import evaluate
import executor
import flops
import generator
import lora
import model
import rollout
import sampling
import train
from jsonl import read_jsonl, write_jsonl_atomic

PHASES = {"decode": "generator decode", "executor": "executor calls", "sandbox": "sandbox", "update": "update fwd+bwd",
          "pi_old": "π_old pass", "eval": "evaluation"}  # the rows, in order: JSON key and label
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                "amx_bf16", "amx_int8", "asimd", "sve", "sve2")
QUICK = dict(problems=1, m=2, eval_problems=1, max_new_tokens=24, call_tokens=12, guides="fewshot", n=3,
             group_size=2, groups_per_problem=2, threads=1, workers=2, timeout=20.0)


def cpu_line():
    name, flags = "unknown CPU", set()  # the CPU model, its vector extensions, torch's threads
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and name == "unknown CPU":
                name = val.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(val.split())
    ext = [f for f in VECTOR_FLAGS if f in flags]
    return {"cpu": name, "vector_extensions": ext, "torch_threads": torch.get_num_threads()}


# ---- instrumentation ----

class TimedExecutor:
    """The run's executor, recording (start, end, usage) of every chat call into `calls`."""

    def __init__(self, ex):
        self.ex, self.calls, self.lock = ex, [], threading.Lock()

    def __getattr__(self, name):
        return getattr(self.ex, name)

    def chat(self, messages, **kw):
        t0 = time.perf_counter()
        text, usage = self.ex.chat(messages, **kw)
        with self.lock:
            self.calls.append((t0, time.perf_counter(), usage))
        return text, usage


def busy(calls):
    """Seconds during which at least one call was in flight (the union of their intervals)."""
    total, end = 0.0, None
    for t0, t1, _ in sorted(calls, key=lambda c: c[0]):
        if end is None or t0 > end:
            total, end = total + t1 - t0, t1
        elif t1 > end:
            total, end = total + t1 - end, t1
    return total


class StubExecutor:
    """--executor stub: answers in this process, greedily, with a (tiny) model through sampling.decode,
    the decoder serve.py runs; its usage counts the real tokens. One call at a time."""

    def __init__(self, mdl, tok):
        self.mdl, self.tok, self.lock, self.tripped = mdl, tok, threading.Lock(), None
        self.stops = sampling.stop_ids(mdl, tok)

    def chat(self, messages, temperature=0.0, max_tokens=512, sample_index=0):
        ids = sampling.prompt_ids(self.tok, messages)
        with self.lock:
            ((toks, _),) = sampling.decode(self.mdl, [ids], 1, max_tokens, 0.0, 1.0, self.stops, self.tok.pad_token_id)
        text = self.tok.decode([t for t in toks if t not in self.stops], skip_special_tokens=True)
        return text, {"prompt_tokens": len(ids), "completion_tokens": len(toks), "cost_usd": 0.0}


@contextlib.contextmanager
def patched(module, name, wrap):
    orig = getattr(module, name)  # module.name = wrap(module.name) while inside
    setattr(module, name, wrap(orig))
    try:
        yield
    finally:
        setattr(module, name, orig)


@contextlib.contextmanager
def instrumented(rec):
    """Record into rec: sample() calls (rec["sample"]: seconds, n, out), the execution half of each
    pipelined chunk (rec["run_s"]), seq_logprobs and step_loss calls (seconds, layout list)."""
    def sampler(orig):
        def make(*a, **k):
            sample = orig(*a, **k)

            def timed(messages_list, n, *rest, **kw):  # collect and eval pass n positionally
                t0 = time.perf_counter()
                out = sample(messages_list, n, *rest, **kw)
                rec["sample"].append((time.perf_counter() - t0, n, out))
                return out
            return timed
        return make

    def sequential(orig):
        def run_all(chunks, generate, run):  # no overlap: each half gets its own wall time
            for chunk in chunks:
                rows, t0 = generate(chunk), time.perf_counter()
                run(rows, chunk)
                rec["run_s"] += time.perf_counter() - t0
        return run_all

    def timer(key, layouts):
        def wrap(orig):
            def timed(*a, **k):
                t0 = time.perf_counter()
                out = orig(*a, **k)
                rec[key].append((time.perf_counter() - t0, layouts(*a, **k)))
                return out
            return timed
        return wrap

    old = lambda mdl, seqs, budget, chunk_size, unit=1, ckpt=False: [flops.train_layout(mb)
                                                                      for mb in train.micro_batches(seqs, budget, unit)]
    with patched(generator, "sampler", sampler), patched(rollout, "pipelined", sequential), \
            patched(train, "seq_logprobs", timer("pi_old", old)), \
            patched(train, "step_loss", timer("step", lambda mdl, mb, *rest, **kw: [flops.train_layout(mb)])):
        yield rec


# ---- the slice ----

def quick_models(seed=0):
    """A tiny random Llama and a character-level tokenizer with a chat template (no download)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Split("", behavior="isolated"), decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="left")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>a:{% endif %}")
    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(c).eval(), tok


def executor_shape(executor_model):
    """The local executor model's shape (--executor-model, default the embedded one), from its config
    (meta tensors: nothing is allocated)."""
    c = AutoConfig.from_pretrained(model.resolve_model_dir(executor_model or model.DEFAULT_MODEL))
    with torch.device("meta"):
        return flops.shape_of(AutoModelForCausalLM.from_config(c))


def synthetic_groups(run_dir, group_size, groups_per_problem):
    """groups.jsonl from the rollouts when curate kept none: per problem, its first
    `groups_per_problem` consecutive runs of `group_size` rows with advantages evenly spread over [-1, 1]."""
    rows = read_jsonl(Path(run_dir) / "iter_0" / "rollouts.jsonl")
    groups = []
    for pid in dict.fromkeys(r["problem_id"] for r in rows):
        rs = sorted((r for r in rows if r["problem_id"] == pid), key=lambda r: r["sample"])
        for g in [rs[i:i + group_size] for i in range(0, len(rs), group_size)][:groups_per_problem]:
            adv = torch.linspace(-1, 1, len(g)).tolist() if len(g) > 1 else [1.0]
            groups.append({"problem_id": pid, "prompt": g[0]["prompt"], "prefill": g[0]["prefill"], "members": [
                {"sample": r["sample"], "completion": r["completion"], "completion_ids": r["completion_ids"],
                 "prompt_ids": r.get("prompt_ids"), "score": r["score"], "advantage": a} for r, a in zip(g, adv)]})
    write_jsonl_atomic(Path(run_dir) / "iter_0" / "groups.jsonl", groups)
    return len(groups)


def row(phase, seconds, tokens=None, flops=None, peak=None, note="", rss=None):
    ok = seconds > 0  # a phase that did nothing has no rates
    return {"phase": phase, "label": PHASES[phase], "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds if tokens is not None and ok else None, "flops": flops,
            "flop_per_s": flops / seconds if flops and ok else None,
            "share": flops / seconds / peak if flops and ok and peak else None, "peak_rss": rss, "note": note}


# ---- peak RSS ----

@contextlib.contextmanager
def measured():
    """Yields a dict m; after the block, m["s"]: its wall seconds, m["rss"]: this process's peak RSS in
    it, bytes (VmHWM reset at its start: proc(5), clear_refs 5), None where that cannot be written."""
    m, ok = {}, False
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "wb", buffering=0) as f:
        ok = f.write(b"5")  # unbuffered: a refused write raises here, leaving ok False
    t0 = time.perf_counter()
    yield m
    m.update(s=time.perf_counter() - t0, rss=bench_gpu.rss_kb("VmHWM") * 1024 if ok else None)


def server_rss(marker=b"serve.py"):
    """Lifetime peak RSS in bytes (VmHWM) of this process's live children whose command line holds
    `marker`: the local executor's servers, which the main thread starts ([] without /proc)."""
    out = []
    with contextlib.suppress(OSError):
        for pid in Path(f"/proc/self/task/{os.getpid()}/children").read_text().split():
            with contextlib.suppress(OSError, StopIteration):  # a child that exited meanwhile
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(bench_gpu.rss_kb("VmHWM", pid) * 1024)
    return out


# ---- the run: setup, then one function per step of the loop ----

def slice_config(args):
    """The loop's defaults with the slice's arguments (--quick: QUICK), checked; sets torch's threads."""
    cfg = config.defaults()
    cfg.update(problems=args.problems, m=args.m, eval_problems=args.eval_problems, epochs=args.epochs,
               executor=args.executor, threads=args.threads, workers=args.workers, prompt_kv=args.prompt_kv,
               checkpoint=args.checkpoint)
    if args.max_new_tokens:
        cfg["max_new_tokens"] = args.max_new_tokens
    if args.quick:
        cfg.update(QUICK, model="tiny-random", executor="stub", epochs=1)
    config.check(cfg)
    rollout.set_threads(cfg["threads"], cfg["executor"])
    return cfg


def load(cfg, quick):
    """(generator with LoRA, tokenizer, executor context manager, executor shape or None, local
    executor's server count or None)."""
    servers = None
    if quick:
        (mdl, tok), (emdl, etok) = quick_models(0), quick_models(1)
        ex_cm, eshape = contextlib.nullcontext(StubExecutor(emdl, etok)), flops.shape_of(emdl)
    else:
        mdl, tok = model.load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
        n = cfg["servers"] or max(1, min(4, os.cpu_count() or 1))  # as rollout.open_executor
        ex_cm = executor.make_executor(cfg["executor"], cfg["executor_model"], None, servers=n)  # no cache
        eshape, servers = (executor_shape(cfg["executor_model"]), n) if cfg["executor"] == "local" else (None, None)
    lora.add_lora(mdl, r=cfg["lora_r"], alpha=cfg["lora_alpha"])
    attention.use(mdl, cfg["prompt_kv"])
    return mdl, tok, ex_cm, eshape, servers


def collect_rows(sl, rows):
    """collect.collect, rollout.pipelined made sequential: the decode, executor and sandbox rows, which
    share its peak RSS (they run inside it at once). Returns (its stats, its measure)."""
    rec, cfg = {"sample": [], "run_s": 0.0}, sl.cfg
    with instrumented(rec), measured() as m:
        st = collect.collect(sl.run_dir, 0, cfg, sl.ex, loaded=(sl.mdl, sl.tok))
    dfl, gen, pos = flops.sample_flops(sl.gshape, [(n, out) for _, n, out in rec["sample"]])
    rows["decode"] = row("decode", sum(c[0] for c in rec["sample"]), gen, dfl, sl.P, f"{len(rec['sample'])} sample() "
                         f"calls, {cfg['problems']} problems x {cfg['m']} workflows, {pos} prompt positions", m["rss"])
    calls = list(sl.ex.calls) if sl.ex else []
    ctoks = sum(u["completion_tokens"] for *_, u in calls)
    rows["executor"] = row("executor", busy(calls), ctoks, flops.call_flops(sl.eshape, calls), sl.P,
                           f"{len(calls)} calls, {sum(u['prompt_tokens'] for *_, u in calls)} prompt tokens"
                           + (f", {sl.servers} server(s) x 1 thread" if sl.servers else ""), m["rss"])
    ran = [r for r in read_jsonl(Path(sl.run_dir) / "iter_0" / "rollouts.jsonl") if r["valid"]]
    sbx = max(0.0, sum(r["seconds"] for r in ran) - sum(t1 - t0 for t0, t1, _ in calls))
    rows["sandbox"] = row("sandbox", sbx, note=f"{len(ran)} workflows ran, {1e3 * sbx / max(1, len(ran)):.0f} ms each "
                          f"outside executor calls; execution wall {rec['run_s']:.1f} s, {cfg['workers']} workers",
                          rss=m["rss"])
    return st, m


def update_rows(sl, rows):
    """curate.run (synthetic groups if it kept none), then train.update: the update and π_old rows,
    which share train.update's peak RSS. Returns its measure."""
    curate.run(sl.run_dir, 0, sl.cfg)
    groups = len(read_jsonl(Path(sl.run_dir) / "iter_0" / "groups.jsonl"))
    synth = groups == 0
    groups = synthetic_groups(sl.run_dir, sl.cfg["group_size"], sl.cfg["groups_per_problem"]) if synth else groups
    rec = {"pi_old": [], "step": []}
    with instrumented(rec), measured() as m:
        steps = train.update(sl.run_dir, 0, sl.cfg, sl.mdl, sl.tok)["steps"]
    fl = lambda key, fns: sum(f(sl.gshape, *x) for _, ls in rec[key] for x in ls for f in fns)
    toks = lambda key: sum(x[0] for _, ls in rec[key] for x in ls)
    old_s, step_s = (sum(t for t, _ in rec[key]) for key in ("pi_old", "step"))
    rows["update"] = row("update", step_s, toks("step"), fl("step", (flops.forward_flops, flops.backward_flops)), sl.P,
                         f"{steps} steps, {len(rec['step'])} micro-batches, {groups} groups"
                         + (" (synthetic advantages: no score variance)" if synth else "")
                         + f"; optimizer + rest {max(0.0, m['s'] - step_s - old_s):.1f} s", m["rss"])
    rows["pi_old"] = row("pi_old", old_s, toks("pi_old"), fl("pi_old", (flops.forward_flops,)), sl.P,
                         f"{len(rec['pi_old'])} seq_logprobs calls", m["rss"])
    return m


def eval_rows(sl, rows):
    """evaluate.eval_generator of the updated generator: the evaluation row. Returns its measure."""
    ev, n_calls = {"sample": [], "run_s": 0.0}, len(sl.ex.calls) if sl.ex else 0
    with instrumented(ev), measured() as m:
        evaluate.eval_generator(sl.mdl, sl.tok, sl.cfg, sl.ex, Path(sl.run_dir) / "eval.jsonl", limit=sl.cfg["eval_problems"])
    ecalls = sl.ex.calls[n_calls:] if sl.ex else []
    efl, egen, _ = flops.sample_flops(sl.gshape, [(n, out) for _, n, out in ev["sample"]])
    rows["eval"] = row("eval", m["s"], egen, efl + flops.call_flops(sl.eshape, ecalls), sl.P,
                       f"{sl.cfg['eval_problems']} problems; decode {sum(c[0] for c in ev['sample']):.1f} s, "
                       f"executor {busy(ecalls):.1f} s ({len(ecalls)} calls), execution wall {ev['run_s']:.1f} s",
                       m["rss"])
    return m


def run(args):
    """Run the slice; {machine, matmul, config, rows} with one row per PHASES entry."""
    cfg = slice_config(args)
    machine, t_all = cpu_line(), time.perf_counter()
    mdl, tok, ex_cm, eshape, servers = load(cfg, args.quick)
    gshape = flops.shape_of(mdl)
    peak = config.matmul_peak(mdl.config.hidden_size, mdl.config.intermediate_size, reps=args.reps)
    rows = {}
    with ex_cm as raw, tempfile.TemporaryDirectory(prefix="spogw-bench-loop-") as run_dir:
        if raw is not None and hasattr(raw, "preflight"):
            raw.preflight()  # also the servers' warm-up
        # sl: what every step needs; P the matmul's FLOP/s (share's denominator)
        sl = types.SimpleNamespace(cfg=cfg, mdl=mdl, tok=tok, ex=TimedExecutor(raw) if raw is not None else None,
                                   run_dir=run_dir, gshape=gshape, eshape=eshape, P=peak["flop_per_s"], servers=servers)
        collect_stats, collect_measure = collect_rows(sl, rows)
        model.release_freed_memory()  # between phases, as train.iteration
        update_measure = update_rows(sl, rows)
        model.release_freed_memory()
        eval_measure = eval_rows(sl, rows)
        server_peaks = server_rss()
    keys = ("bench", "model", "executor", "problems", "m", "eval_problems", "max_new_tokens", "epochs", "workers", "threads",
            "prompt_kv", "checkpoint")
    return {**machine, "matmul": peak, "generator_shape": gshape, "executor_shape": eshape,
            "config": {k: cfg[k] for k in keys}, "collect": collect_stats, "total_s": time.perf_counter() - t_all,
            "phases": {"collect_s": collect_measure["s"], "update_s": update_measure["s"], "eval_s": eval_measure["s"]},
            "server_peak_rss": server_peaks, "rows": [rows[p] for p in PHASES]}


def fmt(x, scale=1.0, spec=".1f"):
    return "-" if x is None else format(x / scale, spec if x == 0 or abs(x / scale) >= 1 else "#.2g")


def print_table(res):
    print(f"cpu: {res['cpu']}; vector extensions: {' '.join(res['vector_extensions']) or 'none found'}; "
          f"torch threads: {res['torch_threads']}")
    (M, H, I), mm = res["matmul"]["shape"], res["matmul"]
    print(f"matmul fp32 [{M}x{H}]@[{H}x{I}]: {mm['flop_per_s'] / 1e9:.2f} GFLOP/s (best of {mm['reps']}): share's denominator")
    c = res["config"]
    print(f"slice: {c['bench']}, generator {c['model']}, executor {c['executor']}, {c['problems']} problems x "
          f"{c['m']} workflows, {c['eval_problems']} held-out, {c['epochs']} epoch(s); {res['total_s']:.1f} s in all")
    print(f"{'phase':<18}{'seconds':>9}{'tokens':>9}{'tok/s':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'share':>8}{'peak RSS':>10}  note")
    for r in res["rows"]:
        rss = "-" if r["peak_rss"] is None else f"{r['peak_rss'] / 1e9:.2f} GB"
        print(f"{r['label']:<18}{r['seconds']:9.2f}{fmt(r['tokens'], spec='.0f'):>9}{fmt(r['tokens_per_s']):>9}"
              f"{fmt(r['flops'], 1e9, '.2f'):>9}{fmt(r['flop_per_s'], 1e9, '.2f'):>9}{fmt(r['share'], spec='.3f'):>8}"
              f"{rss:>10}  {r['note']}")
    print("peak RSS: this process's; decode, executor calls and sandbox share collect's, update and π_old pass update's")
    if res["server_peak_rss"]:
        gbs = ", ".join(f"{b / 1e9:.2f}" for b in res["server_peak_rss"])
        print(f"local executor servers' peak RSS, each over its life: {gbs} GB")


def bench_loop(args):
    res = run(args)
    print(json.dumps(res, indent=1)) if args.json else print_table(res)


def parser(sub):
    p = sub.add_parser("loop", help="one row per phase of a small slice of the embedded default loop",
                       description="python bench.py loop [--problems 2 --m 8 --eval-problems 2] [--quick] [--json]")
    p.add_argument("--problems", type=int, default=2, help="training problems of the slice")
    p.add_argument("--m", type=int, default=8, help="workflows sampled per problem")
    p.add_argument("--eval-problems", type=int, default=2, help="held-out problems evaluated")
    p.add_argument("--epochs", type=int, default=1, help="update epochs")
    p.add_argument("--max-new-tokens", type=int, default=0, help="generator completion length (0: the loop's default)")
    p.add_argument("--executor", choices=("local", "none"), default="local", help="the local executor, or none")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the loop's auto)")
    p.add_argument("--workers", type=int, default=16, help="sandboxes run concurrently (the loop's default)")
    p.add_argument("--prompt-kv", choices=("auto", "shared", "repeat"), default=config.KNOBS["prompt_kv"][0], help="the prompt's K/V in decode and update (train.py's --prompt-kv)")
    p.add_argument("--checkpoint", choices=("on", "off", "auto"), default=config.KNOBS["checkpoint"][0], help="activation checkpointing (train.py's --checkpoint)")
    p.add_argument("--reps", type=int, default=5, help="timed loops of the reference matmul (best one counts)")
    p.add_argument("--quick", action="store_true", help="tiny random models and an in-process stub executor (tests)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(fn=bench_loop)
