"""Speed and memory benchmarks. Ratios against a baseline measured in the same run.

    python bench.py kernel [--device cpu|cuda] [--json]
    python bench.py sandbox
"""
import argparse

# ==== kernel benchmark (owner: kernel helper) ====

# ==== sandbox benchmark (owner: sandbox helper) ====

# ==== CLI ====
if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    # each benchmark section registers itself here: sub.add_parser(name) + set_defaults(fn=...)
    # ---- subcommands ----
    args = ap.parse_args()
    args.fn(args)
