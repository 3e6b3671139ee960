"""The `mixed` benchmark: several problem kinds, generated offline, one scorer per kind (ARCHITECTURE §5).

    python benchmarks.py show mixed --split test --limit 6      # a few rows (kinds interleaved)
    python evaluate.py --bench mixed --baseline io --limit 200
    python headroom.py --bench mixed --limit 50          # every fixed baseline on every kind

In code:  rows = benchmarks.load("mixed", "test");  s = benchmarks.score("mixed", rows[0], "The answer is 42")

Why: on `arith` every useful workflow of the embedded 135M executor calls `programmer`, so a
generator can only learn "call programmer". Here the best fixed workflow differs between kinds, so
a workflow written per problem has something to gain over any single fixed one. The kinds were
chosen by measurement (headroom.py pilots; candidates on which every baseline scored near 0 with
the 135M executor were dropped, see README):
  arith      arith's generated expressions (benchmarks.arith rows, its word problems left out:
             every baseline scored ~0 on them): `programmer` wins
  sentiment  a one-sentence review, "positive or negative?": `programmer` prints the review back
  yesno      "Raj has a gray lamp and a yellow car. Is Raj's lamp gray?": ditto
On the last two a direct `custom` call wins, though only at about the rate of its constant answer
("Positive", "No"): with the 135M executor the benchmark rewards routing (programmer for
arithmetic, a direct answer otherwise), not judgement. The fixed
workflow programmer_format, format(problem, programmer(problem)), routes by itself (format also
sees the problem): it comes within 7 points of the by-kind oracle (README). Each row: id, problem, answer, kind, plus
`options` (the label words) for the label kinds, `form` ("single" or "paren") and `expr` for
arith. Every problem says how to answer ("Answer with a number.", "Answer positive or negative.",
"Answer yes or no.").

Splits are disjoint by construction: arith's rows keep arith's split (a hash of the expression);
the others go by a sha256 bucket of their kind and canonical key (the review's template, subject,
adjective and tail; the yes/no question's facts and asked color). Sizes per kind: train 1700,
validate 170, test 340 (arith's totals 5000 / 500 / 1000, rounded up to thirds). The rows of a
split interleave the kinds (arith, sentiment, yesno, arith, ...); ids mixed-<split>-<kind>-<i>.
"""
import json
import random
import re
from functools import lru_cache

import scorers
import synth
from jsonl import DataError
from synth import SPLITS
KINDS = ("arith", "sentiment", "yesno")
SIZES = {"train": 1700, "validate": 170, "test": 340}  # per kind
MIXED_SEED = 4321  # fixed: everyone gets the same benchmark; load(limit, seed) only picks subsets

SUBJECTS = ["the pizza", "the hotel room", "the movie", "the service", "the new phone", "the concert", "the book",
            "the coffee", "the flight", "the laptop", "the museum tour", "the soup", "the haircut", "the video game",
            "the shoes", "the taxi ride", "the cooking class", "the app", "the beach resort", "the burger",
            "the play", "the headphones", "the train journey", "the bakery", "the camera", "the car rental",
            "the dentist visit", "the gym", "the restaurant", "the album"]
POSITIVE = ["wonderful", "excellent", "amazing", "fantastic", "great", "lovely", "perfect", "superb", "delightful",
            "brilliant", "pleasant", "outstanding", "charming", "impressive", "enjoyable", "terrific", "fabulous",
            "marvelous", "splendid", "awesome"]
NEGATIVE = ["terrible", "awful", "horrible", "disappointing", "dreadful", "poor", "bad", "boring", "annoying",
            "useless", "unpleasant", "lousy", "pathetic", "miserable", "frustrating", "dull", "mediocre",
            "disgusting", "overpriced", "sloppy"]
TAILS = {"positive": ["", "I would recommend it to anyone.", "We will definitely come back.", "Worth every penny."],
         "negative": ["", "I would not recommend it.", "We will never come back.", "What a waste of money."]}
REVIEW = ["{S} was {adj}. {tail}", "Honestly, {s} was {adj}. {tail}", "We tried {s} last week and it was {adj}. {tail}",
          "I have to say {s} was really {adj}. {tail}"]

NAMES = synth.NAMES + ["Kofi", "Lena", "Yuki", "Carlos"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "brown", "pink", "gray", "orange"]
THINGS = ["car", "bike", "hat", "house", "dog", "coat", "cat", "umbrella", "boat", "kite", "scarf", "chair", "lamp",
          "backpack", "phone", "bed"]


def split_of(kind, key):
    """Which split a row belongs to: synth.bucket of its kind and canonical key."""
    return synth.bucket(f"mixed:{kind}:{key}")


# ------------------------------------------------------------------------------------------
# generators: rng -> (canonical key, row without id/kind)

def _sentiment(rng):
    label = rng.choice(["positive", "negative"])
    s, adj = rng.choice(SUBJECTS), rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    t, tail = rng.randrange(len(REVIEW)), rng.choice(TAILS[label])
    text = REVIEW[t].format(S=s[0].upper() + s[1:], s=s, adj=adj, tail=tail).strip()
    problem = f'Review: "{text}"\nIs this review positive or negative? Answer positive or negative.'
    return f"{t}|{s}|{adj}|{tail}", {"problem": problem, "answer": label, "options": ["positive", "negative"]}


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _yesno(rng):
    """Two facts about one person's things, a question about one of them."""
    n, (t1, t2), (c1, c2) = rng.choice(NAMES), rng.sample(THINGS, 2), rng.sample(COLORS, 2)
    tq, label = rng.choice([t1, t2]), rng.choice(["yes", "no"])
    true = c1 if tq == t1 else c2
    asked = true if label == "yes" else rng.choice([c for c in COLORS if c != true])
    problem = f"{n} has {_a(c1 + ' ' + t1)} and {_a(c2 + ' ' + t2)}. Is {n}'s {tq} {asked}? Answer yes or no."
    return f"{n}|{c1} {t1}|{c2} {t2}|{tq}|{asked}", {"problem": problem, "answer": label, "options": ["yes", "no"]}


GENERATORS = {"sentiment": _sentiment, "yesno": _yesno}


def _arith_rows(arith_rows, split):
    """arith's rows are already split by a hash of their expression; word problems left out."""
    rows = [r for r in arith_rows if r["kind"] != "word"][:SIZES[split]]
    return [{"problem": r["problem"] + " Answer with a number.", "answer": r["answer"], "form": r["kind"],
             "expr": r["expr"]} for r in rows]


@lru_cache(maxsize=None)
def _kind_rows(kind, split):
    # one random stream per (kind, split); each keeps only draws whose key hashes to its split
    rng = random.Random(synth.stable_hash(f"{MIXED_SEED}:{kind}:{split}"))
    rows, seen = [], set()
    while len(rows) < SIZES[split]:
        key, row = GENERATORS[kind](rng)
        if key in seen or split_of(kind, key) != split:
            continue
        seen.add(key)
        row["key"] = key
        rows.append(json.dumps(row))
    return tuple(rows)


def load(split, arith_rows):
    """Rows of one split, kinds interleaved; ids mixed-<split>-<kind>-<index within kind>.
    arith_rows: arith's rows of the same split (benchmarks.load passes benchmarks.arith(split))."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for mixed; choose from {', '.join(SPLITS)}")
    per_kind = {k: _arith_rows(arith_rows, split) if k == "arith" else [json.loads(r) for r in _kind_rows(k, split)]
                for k in KINDS}
    out = []
    for i in range(SIZES[split]):
        for k in KINDS:
            row = per_kind[k][i]
            out.append({"id": f"mixed-{split}-{k}-{i:04d}", "kind": k, **row})
    return out


def select(rows, limit):
    """The first `limit` rows of every kind, kinds in order of first appearance (headroom.py and
    router.py measure the same problems of each kind whatever the split's size)."""
    by_kind = {}
    for r in rows:
        if "kind" not in r:
            raise DataError(f"problem {r.get('id')!r} has no 'kind': --bench must be a benchmark with kinds (mixed)")
        by_kind.setdefault(r["kind"], []).append(r)
    return [r for rs in by_kind.values() for r in rs[:limit]]


# ------------------------------------------------------------------------------------------
# scoring

_MARK = re.compile(scorers.ANSWER_MARK, re.I)


def final_segment(text):
    """What an answer says last: the text after its last "Answer:" / "answer is", else all of it;
    markdown emphasis and quotes removed."""
    text = str(text or "")
    marks = list(_MARK.finditer(text))
    if marks and text[marks[-1].end():].strip():
        text = text[marks[-1].end():]
    return re.sub(r"[*_`\"']", "", text).strip()


def score_label(answer, gold, options):
    """1 when the final segment names the gold option and no other ("Positive.", "**banana**",
    "Answer: banana"), or starts with it ("Negative. It is not positive."); 0 otherwise. A list of
    options ("positive or negative", "hammer, banana, ...") is no answer."""
    seg = final_segment(answer).lower()
    opts = [o.lower() for o in options]
    found = [o for o in opts if re.search(rf"\b{re.escape(o)}\b", seg)]
    if len(found) == 1:
        return float(found[0] == gold.lower())
    alts = "|".join(re.escape(o) for o in opts)
    lead = [o for o in found if re.match(rf"\W*{re.escape(o)}\b(?!\s*(?:,|or|and|/)\s*(?:{alts})\b)", seg)]
    return float(lead == [gold.lower()])


def score(row, answer):
    """Score in [0, 1] of a workflow's final answer on one mixed row, by the row's kind."""
    if row["kind"] == "arith":
        return scorers.score_number("" if answer is None else str(answer), row["answer"])
    if row["kind"] in ("sentiment", "yesno"):
        return score_label(answer, row["answer"], row["options"])
    raise DataError(f"row {row.get('id')!r}: unknown mixed kind {row['kind']!r}")
