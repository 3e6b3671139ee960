"""What the benchmarks generated here share (ARCHITECTURE §5): the split names, the stable hash
that draws splits and subsets, and the people their word problems are about.

    python -c "import synth; print(synth.bucket('arith:47*6'), synth.stable_hash('0:arith-test-00000'))"

A leaf: benchmarks.py (arith; every benchmark's splits and seeded subsets) and mixed.py import it,
and mixed.py cannot import benchmarks.py, which imports mixed.py.
"""
import hashlib

SPLITS = ("train", "validate", "test")

# arith's word problems draw from these; mixed.py's yes/no questions from these and a few more
NAMES = ["Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Zoe", "Ivan", "Nina", "Raj", "Eva", "Ben"]


def stable_hash(text):
    """A 64-bit integer of sha256(text): the same in every process and Python version, unlike hash()."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


def bucket(key):
    """Which split a generated row belongs to: a sha256 bucket of its canonical key (2:1:7 of the key
    space to test : validate : train). Rows with the same key never land in two splits."""
    b = stable_hash(key) % 10
    return "test" if b < 2 else "validate" if b == 2 else "train"
