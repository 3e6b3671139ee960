"""Held-out evaluation: a trained generator (one greedy workflow per problem) or a fixed baseline.

    python evaluate.py --bench arith --split test --baseline cot --limit 200            # fixed workflow
    python evaluate.py --run runs/default --iter 3                                      # checkpoint
    python evaluate.py --adapter runs/default/iter_3/adapter --bench arith --limit 200
    python evaluate.py --run runs/default --compare                                     # markdown table
    python evaluate.py --compare-runs runs/mixed-s0 runs/mixed-s1 runs/mixed-s2 --iter 3  # seeds side by side
    python evaluate.py --run runs/w4s --iter 2 --mode refine --turns 3                  # a W4S meta-agent

Workflows run through the same sandbox and the same scorer as training (rollout.py). Per-problem
rows go to runs/<run>/eval/iter_<k>.jsonl (checkpoints) or runs/baselines/<bench>-<split>-<limit>-
<executor>/<baseline>.jsonl (baselines, shared by every run on that benchmark and executor); a
rerun resumes. Accuracy comes with a 95 % percentile-bootstrap CI over problems (report.summarize).
"""
import argparse
import sys
from pathlib import Path

import attention
import benchmarks
import config
import costs
import generator
import lora
import model
import refine
import report
import rollout
import workflow
from jsonl import DataError, read_json, read_jsonl

GREEDY_BATCH = 32  # greedy rows per decode batch


def eval_baseline(name, cfg, ex, split="test", limit=200, out=None):
    """Run the fixed workflow `name` on every problem; rows appended to `out`; the summary."""
    fam = benchmarks.family(cfg["bench"])
    if name not in workflow.BASELINES[fam]:
        raise DataError(f"--baseline must be one of {', '.join(workflow.BASELINES[fam])}, got {name!r}")
    problems = benchmarks.load(cfg["bench"], split, cfg["data_dir"], limit=limit, seed=0)
    return report.summarize(rollout.score_workflow(workflow.BASELINES[fam][name], problems, cfg, ex, out))


def eval_generator(mdl, tok, cfg, ex, out, split="test", limit=200):
    """One greedy workflow per problem from the generator `mdl` (base + adapter), executed and
    scored like training; the summary."""
    problems = benchmarks.load(cfg["bench"], split, cfg["data_dir"], limit=limit, seed=0)
    todo = rollout.pending(Path(out), problems)
    sample = generator.sampler(cfg, None, None, (mdl, tok), local=True)

    def generate(chunk):
        return rollout.sampled_rows(sample, chunk, cfg, 1, 0.0, 0, sampler_fields=False)

    lost = []
    with open(out, "a", encoding="utf-8") as f:
        rollout.pipelined([todo[c:c + GREEDY_BATCH] for c in range(0, len(todo), GREEDY_BATCH)], generate,
                          lambda rows, chunk: lost.extend(rollout.execute(rows, chunk, cfg, ex, f)))
    rollout.require_scored(lost, out)
    return report.summarize(rollout.finish(Path(out), problems))


def runs_comparison(run_dirs, it):
    """Checkpoint `it` of several runs evaluated on the same held-out problems (seeds of one command,
    ablation rows), side by side: costs.runs_table against the best single fixed workflow and the
    router where their rows exist, then what each run writes per kind (benchmarks with kinds)."""
    cfg = dict(config.defaults(), **read_json(Path(run_dirs[0]) / "config.json", {}))
    root, n = Path(run_dirs[0]).parent, cfg["eval_problems"]
    problems = benchmarks.load(cfg["bench"], "test", cfg["data_dir"], limit=n, seed=0)
    kinds = {p["id"]: p.get("kind", "all") for p in problems}
    runs = {}
    for d in run_dirs:
        path = Path(d) / "eval" / f"iter_{it}.jsonl"
        rows = [r for r in read_jsonl(path) if r["problem_id"] in kinds] if path.is_file() else []
        if len(rows) != len(kinds):
            raise DataError(f"{path}: {len(rows)} of the {len(kinds)} held-out problems evaluated "
                            f"(python evaluate.py --run {d} --iter {it})")
        runs[Path(d).name] = rows
    base = {b: read_jsonl(p)[:n] for b in workflow.BASELINES[benchmarks.family(cfg["bench"])]
            if (p := report.baseline_path(cfg, b, "test", n, root)).is_file()}
    fixed, res = report.cost_oracle_of(base, kinds)
    if res is None:
        raise DataError(f"no fixed workflow has rows for all {n} problems under {root}/baselines "
                        f"(python evaluate.py --bench {cfg['bench']} --baseline programmer --limit {n})")
    against = {res["single"]: fixed[res["single"]]} | ({"router": r} if (r := report.router_rows(cfg, problems, root)) else {})
    return "\n".join(costs.runs_table(res, runs, against) + [""] + report.workflow_shares(runs, kinds, top=2, head="run"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run dir (checkpoint mode, --compare; its config.json supplies the knobs not given)")
    ap.add_argument("--iter", type=int, help="evaluate the generator of this iteration of --run")
    ap.add_argument("--adapter", help="evaluate base + this PEFT-layout adapter")
    ap.add_argument("--baseline", help="a fixed workflow: " + " | ".join(workflow.BASELINES["math"]) + " (math, mixed); "
                    "code has no programmer_format, QA no programmer")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="held-out problems (default: --run's eval_problems, else 200): a "
                    "checkpoint is then evaluated on the problems its run's report and baselines use")
    ap.add_argument("--compare", action="store_true", help="print the table of evaluated iterations and baselines")
    ap.add_argument("--compare-runs", nargs="+", metavar="RUN", help="runs evaluated on the same held-out problems (seeds, "
                    "ablation rows): checkpoint --iter of each side by side, paired against the best fixed workflow")
    config.add_knobs(ap, ("run", "collect", "refine"))
    args = ap.parse_args(argv)

    def body():
        if args.compare_runs:
            if args.iter is None:
                raise DataError("--compare-runs needs --iter K")
            return runs_comparison(args.compare_runs, args.iter)
        cfg = config.merge(args.run, args, ("run", "collect", "refine", "eval"))
        if args.limit is None:  # the run's own held-out size, so its report's rows and baselines line up
            args.limit = cfg["eval_problems"]
        if args.compare:
            if not args.run:
                raise DataError("--compare needs --run")
            return report.compare_table(args.run, cfg, args.split, args.limit)
        if cfg["mode"] == "refine":
            if not args.run or args.iter is None:
                raise DataError("--mode refine needs --run DIR --iter K")
        elif not (args.baseline or args.adapter or (args.run and args.iter is not None)):
            raise DataError("give --baseline NAME, --adapter DIR, or --run DIR --iter K")
        rollout.set_threads(cfg["threads"], cfg["executor"])
        with rollout.open_executor(cfg, generator=cfg["mode"] == "refine") as ex:
            if cfg["mode"] == "refine":  # the meta-agent of iteration K, here or (--generator-url) in the server
                s = refine.evaluate_refine(generator.sampler(cfg, args.run, args.iter, max_new_tokens=cfg["refine_tokens"]),
                                           cfg, ex, cfg["turns"], Path(args.run) / "eval", f"refine_iter_{args.iter}",
                                           test_problems=args.limit)
                return "\n".join(report.EVAL_HEADER + [report.format_eval(s)])
            if args.baseline:
                out = report.baseline_path(cfg, args.baseline, args.split, args.limit)
                s = eval_baseline(args.baseline, cfg, ex, args.split, args.limit, out)
            else:
                mdl, tok = model.load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
                attention.use(mdl, cfg["prompt_kv"])
                if args.adapter:
                    lora.load_adapter(mdl, args.adapter)
                    out = Path(args.adapter).parent / f"eval_{args.split}_{args.limit}.jsonl"
                else:
                    if args.iter > 0:
                        lora.load_adapter(mdl, generator.adapter_dir(args.run, args.iter))
                    out = Path(args.run) / "eval" / f"iter_{args.iter}.jsonl"
                s = eval_generator(mdl, tok, cfg, ex, out, args.split, args.limit)
        return (f"accuracy {100 * s['accuracy']:.1f} % (95 % CI {100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}), "
                f"n={s['n']}, valid {100 * s['valid']:.0f} %, executor tokens {s['executor_tokens']}, "
                f"${s['cost_usd']:.4f}\nrows: {out}")
    print(config.cli(body))


if __name__ == "__main__":
    sys.exit(main())
