"""Collect: sample m workflows per problem from the generator, run each in the sandbox, score -> rollouts.

    python collect.py --run runs/default --iter 0                      # embedded default, arith
    python collect.py --run runs/x --iter 1 --bench gsm8k --executor-url https://api.openai.com/v1 \
        --executor-model gpt-4o-mini --runs 3
    python collect.py --run runs/x --iter 1 --generator-url http://localhost:8000/v1 --generator-name base
    python collect.py --run runs/w4s --iter 0 --mode refine                # W4S episodes instead

With --guides fewshot the prompt's few-shot workflows also run on every problem, as samples m, m+1,
... marked `guide`: off-policy members of its groups, so a group can rank workflows the generator
rarely writes yet (a 135M generator copies the prompt's last example); the stats count the sampled rows.
One row per (problem, sample) is appended to runs/<run>/iter_<k>/rollouts.jsonl as soon as that
workflow is scored (ARCHITECTURE §11). Resumable: problems are sampled in fixed chunks with a seed per
chunk, so a restarted run regenerates exactly the same completions and only executes the missing
(problem, sample) rows; the finished file equals an uninterrupted run's, up to row order.
Settings not given on the command line come from runs/<run>/config.json (written by train.py).
With --generator-url a vLLM server samples (README "vLLM recipe"): iteration 0 from the base model
it serves as --generator-name, iteration k >= 1 from iter_k/adapter, which is loaded into the server
under a name of its own first (generator.serve_generator).
With --mode refine the step is W4S's: episodes of a meta-agent refining one workflow (refine.py).
"""
import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

import benchmarks
import config
import generator
import refine
import rollout
import workflow
from jsonl import DataError, read_jsonl, truncate_torn_tail

def collect(run_dir, it, cfg, ex=None, loaded=None):
    """Fill iter_<it>/rollouts.jsonl; returns the collect stats. `loaded` = (model, tokenizer)
    to reuse a loaded one (the driver does), else it is loaded on first use."""
    iter_dir = Path(run_dir) / f"iter_{it}"
    iter_dir.mkdir(parents=True, exist_ok=True)
    out = iter_dir / "rollouts.jsonl"
    problems = rollout.problems_for(cfg, it)
    truncate_torn_tail(out)  # a kill mid-write leaves half a row: drop it, it will be redone
    done = {(r["problem_id"], r["sample"]) for r in read_jsonl(out)} if out.exists() else set()
    guides = workflow.guide_completions(benchmarks.family(cfg["bench"])) if cfg["guides"] == "fewshot" else []
    per_problem = cfg["m"] + len(guides)  # samples 0..m-1, then the guides (off-policy members, `guide` set)
    total = len(problems) * per_problem
    t0 = time.time()
    if len(done) < total:
        sample = generator.sampler(cfg, run_dir, it, loaded)
        stats = {"n": len(done), "valid": 0, "score": 0.0, "tokens": 0, "seen": 0}
        bar = tqdm(total=total, initial=len(done), desc=f"collect iter {it}", unit="wf", dynamic_ncols=True)

        def progress(row):
            stats["seen"] += 1
            stats["valid"] += row["valid"]
            stats["score"] += row["score"]
            stats["tokens"] += row["prompt_tokens"] + row["completion_tokens"]
            bar.update(1)
            bar.set_postfix(valid=f"{stats['valid'] / stats['seen']:.0%}", score=f"{stats['score'] / stats['seen']:.2f}",
                            exec_tok=stats["tokens"])

        batch = cfg["gen_batch"]
        chunks = [(c // batch, problems[c:c + batch]) for c in range(0, len(problems), batch)]
        chunks = [(k, ch) for k, ch in chunks if not all((p["id"], j) in done for p in ch for j in range(per_problem))]

        def generate(item):
            k, chunk = item
            seed = config.seed_of(cfg["seed"], it, k)  # per chunk: a resumed run regenerates the same samples
            return rollout.sampled_rows(sample, chunk, cfg, cfg["m"], cfg["temperature"], seed, skip=done, guides=guides)

        lost = []
        with open(out, "a", encoding="utf-8") as f:
            rollout.pipelined(chunks, generate,
                              lambda rows, item: lost.extend(rollout.execute(rows, item[1], cfg, ex, f, progress)))
        bar.close()
        rollout.require_scored(lost, out)
    rows = read_jsonl(out)
    if len(rows) != total or len({(r["problem_id"], r["sample"]) for r in rows}) != total:
        raise DataError(f"{out}: expected {total} distinct (problem, sample) rows, found {len(rows)}")
    sampled = [r for r in rows if not r.get("guide")]  # the generator's own workflows; the guides are fixed
    stats = {"rows": total, "valid_fraction": sum(r["valid"] for r in sampled) / len(sampled),
             "mean_score": statistics.fmean(r["score"] for r in sampled),
             "mean_score_valid": statistics.fmean([r["score"] for r in sampled if r["valid"]] or [0.0])}
    if guides:
        stats["guide_rows"] = total - len(sampled)
    return rollout.save_stats(iter_dir, "collect", stats, rows, t0, sampled, "--max-new-tokens", cfg["max_new_tokens"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (its config.json supplies the knobs not given)")
    ap.add_argument("--iter", type=int, required=True, help="the iteration whose generator samples")
    config.add_knobs(ap, ("run", "collect", "refine"))
    args = ap.parse_args(argv)

    def body():
        cfg = config.merge(args.run, args, ("run", "collect", "refine"))
        rollout.set_threads(cfg["threads"], cfg["executor"])
        with rollout.open_executor(cfg) as ex:
            step = refine.collect_refine if cfg["mode"] == "refine" else collect
            return step(args.run, args.iter, cfg, ex)
    print(json.dumps(config.cli(body)))


if __name__ == "__main__":
    main()
