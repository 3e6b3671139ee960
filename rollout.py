"""Running and scoring workflows, shared by collect.py, evaluate.py and refine.py (ARCHITECTURE §1, §4).

    python collect.py --run runs/x --iter 0          # sample -> check -> run in the sandbox -> score -> rollouts

A sampled completion becomes a row (workflow_row: the code block, the static check); execute runs
every valid row `runs` times in the sandbox pool with the run's executor (open_executor) and
appends it, scored, as soon as its last run ends. pipelined overlaps sampling the next chunk with
executing this one. An executor failure is never a score: its row is left out and the step stops
(require_scored), the rows written kept for the rerun.
"""
import contextlib
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

import benchmarks
import config
import executor
import model
import operators
import report
import sandbox
import scorers
import workflow
from generator import preflight_generator
from jsonl import DataError, append_jsonl, read_jsonl, truncate_torn_tail, update_json

CAP_WARN = 0.10  # warn when more than this fraction of completions ran into the token cap
COST_REF_PROBLEMS = 60  # train problems the cost unit (cost_reference) is measured on: 20 per mixed kind


def executor_cache():
    """One on-disk executor cache per machine: re-running any step, or evaluating the same workflow
    twice, costs no executor call (keys include the executor's model name)."""
    return str(model.cache_root() / "executor")


@contextlib.contextmanager
def open_executor(cfg, generator=True):
    """`with open_executor(cfg) as ex:` -- the run's executor (executor.make_executor), checked by
    one request (Executor.preflight) before it is handed out, and --generator-url's /models when
    `generator` (the step samples from it). The local executor runs one single-threaded server per
    core: while workflows execute the generator is mostly idle, and a second server turned that
    idle core into ~1.3-1.5x executor throughput."""
    config.check(cfg)  # a hand-made cfg (tests, scripts) gets the checks the CLIs get
    if generator:
        preflight_generator(cfg)
    if cfg["executor"] == "local":
        if torch.cuda.is_available():
            print("note: --executor local serves on the CPU; on a GPU serve the executor there and pass "
                  "--executor-url (README, Scaling up)", file=sys.stderr)
    client = dict(max_in_flight=cfg.get("max_in_flight"), max_fail_frac=cfg.get("max_fail_frac"),
                  fail_window=cfg.get("fail_window"), max_retries=cfg.get("executor_retries"),
                  base_delay=cfg.get("executor_backoff"))
    servers = cfg["servers"] or max(1, min(4, os.cpu_count() or 1))
    with executor.make_executor(cfg["executor"], cfg["executor_model"], executor_cache(), servers=servers,
                                **{k: v for k, v in client.items() if v is not None}) as ex:
        if ex is not None:
            ex.preflight()
        yield ex


def require_scored(lost, out):
    """After a step: rows left out because the executor failed (`lost`: one message each) stop the
    run with InfraError. The rows written stay; a rerun redoes only the missing ones."""
    if lost:
        raise executor.InfraError(f"{len(lost)} workflow(s) not scored because the executor failed; the rows scored "
                                  f"so far are kept in {out}, rerun to redo the rest. Last failure: {lost[-1]}")


def set_threads(threads, executor_spec):
    """Torch's OpenMP threads spin while they wait: on a small CPU shared with the local executor
    server and the sandboxes, two threads ran ~10x slower than one. `threads` is --threads; its
    auto (0) = every core but one when the executor (--executor, `executor_spec`) is "local", i.e.
    runs on this machine, else torch's own default."""
    n = threads or (max(1, (os.cpu_count() or 2) - 1) if executor_spec == "local" else 0)
    if n:
        torch.set_num_threads(n)


def run_context(problem, reply_cap, sample_index=0):
    """What operators see of one run: the problem's fields, the run index, the reply cap
    (config.call_tokens of the run; None = the operators' own limits)."""
    return {**problem, "sample_index": sample_index, **({"max_tokens": reply_cap} if reply_cap else {})}


def problems_for(cfg, it):
    """Iteration `it`'s training problems: a fresh seeded subset of the train split each iteration,
    so the generator sees new problems every round (--draw kind: the kinds in equal numbers)."""
    return benchmarks.load(cfg["bench"], "train", cfg["data_dir"], limit=cfg["problems"],
                           seed=config.seed_of(cfg["seed"], "problems", it), by_kind=cfg["draw"] == "kind")


def workflow_row(problem, j, prompt, prefill, completion, ids, family_ops, max_calls, prompt_ids=None, hit_cap=None):
    """The row before execution: verbatim completion, extracted code, static check. prompt_ids: the
    token ids the sampler saw (template + prefill), which training uses instead of re-rendering
    `prompt`; hit_cap: the completion ran into max_new_tokens (counted in the stats)."""
    code = scorers.extract_code(prefill + completion)
    if code is None:
        ok, reason = False, "no python block"
    else:
        ok, reason = workflow.check_workflow(code, problem["problem"], allowed_ops=family_ops, max_calls=max_calls)
    row = {"problem_id": problem["id"], "sample": j, "prompt": prompt, "prefill": prefill,
           "completion": completion, "completion_ids": ids, "code": code, "valid": bool(ok),
           "reason": None if ok else reason}
    if prompt_ids is not None:
        row["prompt_ids"] = list(prompt_ids)
    if hit_cap is not None:
        row["hit_cap"] = bool(hit_cap)
    return row


def sampled_rows(sample, chunk, cfg, n, temperature, seed, skip=(), sampler_fields=True, guides=()):
    """The rows, before execution, of `n` workflows per problem of `chunk` drawn in one call of
    `sample` (generator.sampler) from the generator prompt after its prefill; (problem id, sample)
    pairs in `skip` are left out (already written). sampler_fields: keep each sample's prompt ids
    and token-cap flag, which training reads (collect); held-out rows go without them (evaluate).
    guides: completions that follow each problem's samples as samples n, n+1, ..., marked `guide`."""
    fam = benchmarks.family(cfg["bench"])
    prefill = workflow.PREFILLS[fam]
    msgs = [workflow.build_prompt(p["problem"], fam, max_calls=cfg["max_calls"]) for p in chunk]
    samples = sample(msgs, n, temperature, seed, prefill, guides)
    return [dict(workflow_row(p, j, m, prefill, s["text"], s["token_ids"], operators.OPERATOR_SETS[fam], cfg["max_calls"],
                              prompt_ids=s.get("prompt_ids") if sampler_fields else None,
                              hit_cap=s["hit_cap"] if sampler_fields else None), **({"guide": True} if s.get("guide") else {}))
            for p, m, per in zip(chunk, msgs, samples) for j, s in enumerate(per) if (p["id"], j) not in skip]


def cap_warning(rows, knob, cap):
    """(fraction of rows whose completion hit the token cap, a warning line or None). Defaults sized
    for a 135M model cut a bigger model's workflows off mid-block; the run says so."""
    frac = statistics.fmean(bool(r.get("hit_cap")) for r in rows) if rows else 0.0
    if frac <= CAP_WARN:
        return frac, None
    return frac, (f"warning: {frac:.0%} of the completions hit {knob} {cap} and were cut off; "
                  f"raise {knob} for this model")


def save_stats(iter_dir, step, stats, rows, t0, sampled, knob, cap):
    """A sampling step's stats completed and saved under `step` in iter_dir/stats.json: the executor
    tokens and dollars of `rows`, the seconds since `t0`, the share of the `sampled` rows whose
    completion hit the token cap `knob` (cap_warning, printed when too high)."""
    stats.update(executor_tokens=sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows),
                 cost_usd=sum(r["cost_usd"] for r in rows), seconds=time.time() - t0)
    stats["hit_cap_fraction"], warning = cap_warning(sampled, knob, cap)
    if warning:
        print(warning, file=sys.stderr)
    update_json(iter_dir / "stats.json", step, stats)
    return stats


def execute(rows, problems, cfg, ex, out_file, progress=None):
    """Run every valid workflow cfg['runs'] times in the sandbox pool and score it on cfg['bench'];
    append each row to the open file `out_file` when its last run is scored. Invalid workflows are
    written at once with score 0. A run that met an executor failure (result["infra_error"]) is no
    score: its row is left out (a rerun redoes it) and returned as one message in the list this
    returns; once the executor has tripped (a fatal error, too many failures) InfraError stops the
    step at once, the rows written so far kept."""
    bench, reply_cap = cfg["bench"], config.call_tokens(cfg)
    by_id = {p["id"]: p for p in problems}
    ops = {k: operators.OPERATORS[k] for k in operators.OPERATOR_SETS[benchmarks.family(bench)]}
    jobs, owners = [], []
    for i, row in enumerate(rows):
        if not row["valid"]:
            row.update(scores=[0.0], score=0.0, answers=[None], errors=[f"invalid: {row['reason']}"], calls=0,
                       prompt_tokens=0, completion_tokens=0, cost_usd=0.0, seconds=0.0)
            append_jsonl(out_file, row)
            if progress:
                progress(row)
            continue
        p = by_id[row["problem_id"]]
        for r in range(cfg["runs"]):
            jobs.append(operators.job(row["code"], p["problem"], executor=ex, operators=ops,
                                      context=run_context(p, reply_cap, r), timeout=cfg["timeout"], max_calls=cfg["max_calls"]))
            owners.append(i)
    results = {i: [] for i in set(owners)}
    lost = []
    for k, res in sandbox.run_many(jobs, workers=cfg["workers"]):
        i = owners[k]
        if res["infra_error"] and getattr(ex, "tripped", None):
            raise executor.InfraError(f"{ex.tripped}\nrows scored so far are kept in {out_file.name}; rerun to resume",
                                      fatal=True)
        res["score"] = 0.0 if res["error"] else benchmarks.score(bench, by_id[rows[i]["problem_id"]], res["answer"])
        results[i].append(res)
        if len(results[i]) == cfg["runs"]:
            rs, row = results.pop(i), rows[i]
            if any(x["infra_error"] for x in rs):
                lost.append(next(x["infra_error"] for x in rs if x["infra_error"]))
                continue
            row.update(scores=[x["score"] for x in rs], score=statistics.fmean(x["score"] for x in rs),
                       answers=[x["answer"] for x in rs], errors=[x["error"] for x in rs],
                       calls=sum(x["calls"] for x in rs), prompt_tokens=sum(x["prompt_tokens"] for x in rs),
                       completion_tokens=sum(x["completion_tokens"] for x in rs),
                       cost_usd=sum(x["cost_usd"] for x in rs), seconds=sum(x["seconds"] for x in rs))
            append_jsonl(out_file, row)
            if progress:
                progress(row)
    return lost


def pipelined(chunks, generate, run):
    """rows = generate(chunk) here while run(rows, chunk) of the previous chunk goes on in a second
    thread: sampling (a torch thread) and execution (the executor, the sandboxes) use different
    cores, so neither waits for the other. An error in either surfaces here."""
    with ThreadPoolExecutor(1) as pool:
        fut = None
        try:
            for chunk in chunks:
                if fut and fut.done():
                    fut.result()  # a failed run stops us before the next (slow) sampling
                rows = generate(chunk)
                if fut:
                    fut.result()
                fut = pool.submit(run, rows, chunk)
            if fut:
                fut.result()
        except BaseException:
            if fut is not None:  # Ctrl-C, SIGTERM or an error here: the other thread's sandboxes end now
                with sandbox.stopping():
                    wait([fut])
            raise


def pending(out, problems):
    """The problems that have no row in `out` yet (a torn last row dropped first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    truncate_torn_tail(out)
    done = {r["problem_id"] for r in read_jsonl(out)} if out.exists() else set()
    return [p for p in problems if p["id"] not in done]


def finish(out, problems):
    """The rows of `problems`, in the problems' order."""
    order = {p["id"]: i for i, p in enumerate(problems)}
    rows = sorted((r for r in read_jsonl(out) if r["problem_id"] in order), key=lambda r: order[r["problem_id"]])
    if len(rows) != len(order):
        raise DataError(f"{out}: expected {len(order)} problems, found {len(rows)}")
    return rows


def cost_reference(run_dir, cfg, ex=None):
    """The cost unit of --cost-weight: mean executor tokens per problem of the fixed workflow
    --cost-ref on the first COST_REF_PROBLEMS train problems, with the run's executor (opened here
    when `ex` is None and rows are missing). Rows are shared like baseline rows (report.baseline_path
    beside the run dir), so every seed and every lambda of a study uses one unit. The default unit,
    programmer_format, is the best fixed workflow on arith and mixed: c = 1 means "as dear as what a
    per-query workflow must beat", and lambda is the accuracy one would give up not to pay that."""
    fam = benchmarks.family(cfg["bench"])
    if cfg["cost_ref"] not in workflow.BASELINES[fam]:
        raise DataError(f"--cost-ref must be one of {', '.join(workflow.BASELINES[fam])}, got {cfg['cost_ref']!r}")
    problems = benchmarks.load(cfg["bench"], "train", cfg["data_dir"], limit=COST_REF_PROBLEMS, seed=0)
    out = report.baseline_path(cfg, cfg["cost_ref"], "train", COST_REF_PROBLEMS, Path(run_dir).parent)
    if pending(out, problems):
        with contextlib.nullcontext(ex) if ex is not None else open_executor(cfg, generator=False) as e:
            score_workflow(workflow.BASELINES[fam][cfg["cost_ref"]], problems, cfg, e, out)
    tokens = statistics.fmean(r["prompt_tokens"] + r["completion_tokens"] for r in finish(out, problems))
    if tokens <= 0:
        raise DataError(f"{out}: the --cost-ref workflow used no executor tokens, so it cannot be the cost unit")
    return tokens


def score_workflow(code, problems, cfg, ex, out):
    """One fixed workflow on every problem once (rows appended to `out`, resumable): the rows in the
    problems' order. Fixed baselines and refined workflows are scored this way."""
    out = Path(out)
    todo = pending(out, problems)
    rows = [{"problem_id": p["id"], "sample": 0, "prompt": None, "prefill": "", "completion": code,
             "completion_ids": [], "code": code, "valid": True, "reason": None} for p in todo]
    with open(out, "a", encoding="utf-8") as f:
        lost = execute(rows, todo, cfg, ex, f)
    require_scored(lost, out)
    return finish(out, problems)
