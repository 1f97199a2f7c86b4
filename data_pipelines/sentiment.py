"""A generated sentiment data set where word order decides the label: negation, contrast and filler.

Each record is {"text": "...", "label": 0 | 1, "form": "plain" | "negation" | "contrast"}, e.g.

    {"text": "we watched it at home. the plot was dull, but the acting was truly superb.", "label": 1, ...}
    {"text": "i would not say the ending felt very moving.", "label": 0, "form": "negation"}

How a review is built (`make_review`)
    A review is one opinion sentence and 0 to `max_filler` filler sentences in random order. Filler is
    neutral ("it runs for about two hours."); some filler holds a "not" ("i had not read the book.") that
    does not touch the opinion. The opinion sentence is one clause, or two clauses of opposite meaning
    joined in one of three ways. A clause is an aspect, a verb phrase and an adjective from POSITIVE or
    NEGATIVE, with an optional intensifier ("very", "truly") before the adjective, and, with probability
    `p_negate`, a negation: "was not", "is never", "did not seem", or a frame in front ("i would not say"),
    sometimes over a negated verb phrase (a double negation: "i do not think the cast was not good").

The label rule (`rule_label` computes it from the text alone; the generator's labels are checked against it)
    1. The opinion sentence is the one sentence that holds a POSITIVE or NEGATIVE word; filler is ignored.
    2. Its deciding clause is:  "A, but B."      -> B
                                "although A, B." -> B
                                "A, although B." -> A
                                "A."             -> A
    3. The deciding clause's value is its adjective's polarity, flipped once for every negator ("not",
       "never") in that clause; intensifiers change nothing. label = 1 if the value is positive, else 0.

Why this makes order matter
    A bag of words sees "not" and "good" but not whether "not" belongs to the opinion clause or to filler,
    nor which clause of a contrast comes after "but"; so a linear model over word counts can do no better
    than guess on much of the negation and contrast forms, and is exact only on plain reviews. A recurrent
    model reads the words in order and can do all three. `form` records which case a review is, so accuracy
    can be broken down by form. Labels are balanced by construction (the adjective and the negation are
    drawn independently of everything else).

Splits (`make_splits`) come from one stream of reviews drawn from `seed`, with duplicate texts dropped, taken
in order for train, val, test: no text is in two splits.

    python -m data_pipelines.sentiment --out data/sentiment --n-train 8000 --n-val 1000 --n-test 2000 --seed 0

writes OUT/train.jsonl, OUT/val.jsonl and OUT/test.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from workbench.config import field_

POSITIVE = ("good", "great", "superb", "wonderful", "brilliant", "delightful", "charming", "gripping",
            "excellent", "clever", "moving", "fun")
NEGATIVE = ("bad", "awful", "dull", "boring", "terrible", "weak", "clumsy", "tedious", "bland", "poor",
            "messy", "forgettable")
NEGATORS = ("not", "never")
ASPECTS = ("the plot", "the acting", "the film", "the movie", "the script", "the soundtrack", "the ending",
           "the cast", "the dialogue", "the pacing", "the camera work", "the story")
INTENSIFIERS = ("very", "really", "truly", "quite", "extremely", "so", "rather")
VERBS = ("was", "is", "felt", "seemed")
NEGATED_VERBS = ("was not", "is not", "was never", "is never", "never felt", "did not seem", "did not feel")
FRAMES = ("i would not say", "i do not think", "i never thought")  # a negation in front of the clause
FILLER = ("i saw it last week", "we watched it at home", "it runs for about two hours", "my sister picked it",
          "the cinema was half empty", "it is based on a novel", "i went with two friends",
          "it came out in march", "we had popcorn and soda", "the director also wrote it",
          "i had not read the book", "it was not my first time seeing it", "we did not stay for the credits")
FORMS = ("plain", "negation", "contrast")
TOKEN_RE = re.compile(r"[a-z]+|[.,]")


@dataclass
class SentimentConfig:
    """Knobs of the generator (the sentiment task's [task.data] section)."""

    p_contrast: float = field_(0.25, ge=0, le=1, doc="an opinion sentence has two clauses")
    p_negate: float = field_(0.27, ge=0, le=1, doc="a clause is negated")
    p_frame: float = field_(0.25, ge=0, le=1, doc="a negated clause is negated by a frame in front, not by its verb")
    p_double: float = field_(0.3, ge=0, le=1, doc="a framed clause has a negated verb as well (a double negation)")
    p_intensify: float = field_(0.4, ge=0, le=1, doc="a clause's adjective gets an intensifier")
    max_filler: int = field_(2, ge=0, le=len(FILLER), doc="filler sentences per review: 0 .. max_filler")


def _clause(rng: random.Random, cfg: SentimentConfig, value: int) -> tuple[str, bool]:
    """A clause whose value (adjective polarity, times -1 per negator) is `value` (+1 / -1); and whether negated."""
    aspect = rng.choice(ASPECTS)
    intensifier = f"{rng.choice(INTENSIFIERS)} " if rng.random() < cfg.p_intensify else ""
    adjective = lambda polarity: intensifier + rng.choice(POSITIVE if polarity > 0 else NEGATIVE)  # noqa: E731
    if rng.random() >= cfg.p_negate:
        return f"{aspect} {rng.choice(VERBS)} {adjective(value)}", False
    if rng.random() < cfg.p_frame:
        if rng.random() < cfg.p_double:
            # two negators (the frame's and the verb's): the adjective keeps the clause's value
            return f"{rng.choice(FRAMES)} {aspect} {rng.choice(NEGATED_VERBS)} {adjective(value)}", True
        return f"{rng.choice(FRAMES)} {aspect} {rng.choice(VERBS)} {adjective(-value)}", True
    return f"{aspect} {rng.choice(NEGATED_VERBS)} {adjective(-value)}", True


def make_review(rng: random.Random, cfg: SentimentConfig | None = None) -> dict:
    """One review {"text", "label", "form"}, drawn from rng."""
    cfg = cfg or SentimentConfig()
    label = rng.randrange(2)
    value = 1 if label else -1
    if rng.random() < cfg.p_contrast:
        deciding, _ = _clause(rng, cfg, value)
        other, _ = _clause(rng, cfg, -value)
        join = rng.randrange(3)
        if join == 0:
            opinion = f"{other}, but {deciding}"
        elif join == 1:
            opinion = f"although {other}, {deciding}"
        else:
            opinion = f"{deciding}, although {other}"
        form = "contrast"
    else:
        opinion, negated = _clause(rng, cfg, value)
        form = "negation" if negated else "plain"
    sentences = rng.sample(FILLER, rng.randint(0, cfg.max_filler))
    sentences.insert(rng.randint(0, len(sentences)), opinion)
    return {"text": " ".join(s + "." for s in sentences), "label": label, "form": form}


def make_splits(n_train: int, n_val: int, n_test: int, seed: int = 0,
                cfg: SentimentConfig | None = None) -> dict[str, list[dict]]:
    """Disjoint train / val / test lists of reviews from one seeded stream (duplicate texts dropped)."""
    if min(n_train, n_val, n_test) < 0:
        raise ValueError(f"split sizes must be >= 0, got {n_train}, {n_val}, {n_test}")
    rng, seen, reviews = random.Random(seed), set(), []
    total, tries = n_train + n_val + n_test, 0
    while len(reviews) < total:
        tries += 1
        if tries > 20 * total + 1000:
            raise ValueError(f"cannot draw {total} distinct reviews with these settings (got {len(reviews)})")
        review = make_review(rng, cfg)
        if review["text"] not in seen:
            seen.add(review["text"])
            reviews.append(review)
    return {"train": reviews[:n_train], "val": reviews[n_train:n_train + n_val],
            "test": reviews[n_train + n_val:]}


# ----------------------------------------------------------------------------------------------------
# The documented rule, from the text alone


def tokenize(text: str) -> list[str]:
    """Lower-case words and the punctuation marks '.' and ','."""
    return TOKEN_RE.findall(text.lower())


def rule_label(text: str) -> int:
    """The label by the rule in the module notes, read from the text (raises if the text has no single opinion)."""
    sentences = [tokenize(s) for s in text.split(".") if s.strip()]
    opinions = [s for s in sentences if any(w in POSITIVE or w in NEGATIVE for w in s)]
    if len(opinions) != 1:
        raise ValueError(f"expected exactly one sentence with an opinion word, found {len(opinions)}: {text!r}")
    words = opinions[0]
    if "but" in words:  # A, but B -> B
        clause = words[words.index("but") + 1:]
    elif words[0] == "although":  # although A, B -> B
        clause = words[words.index(",") + 1:]
    elif "although" in words:  # A, although B -> A
        clause = words[:words.index("although")]
    else:
        clause = words
    polar = [w for w in clause if w in POSITIVE or w in NEGATIVE]
    if len(polar) != 1:
        raise ValueError(f"expected one opinion word in the deciding clause {' '.join(clause)!r}, got {polar}")
    value = 1 if polar[0] in POSITIVE else -1
    # flipped once per negator in the clause
    value *= (-1) ** sum(w in NEGATORS for w in clause)
    return int(value > 0)


def build_vocab(texts, min_count: int = 1) -> dict[str, int]:
    """Word -> id over the tokens of `texts`, sorted for determinism; 0 is <pad>, 1 is <unk>."""
    counts: dict[str, int] = {}
    for text in texts:
        for w in tokenize(text):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= min_count)
    return {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}


def encode(text: str, vocab: dict[str, int]) -> list[int]:
    return [vocab.get(w, 1) for w in tokenize(text)]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    splits = make_splits(args.n_train, args.n_val, args.n_test, args.seed)
    for name, records in splits.items():
        print(f"{write_jsonl(records, Path(args.out) / f'{name}.jsonl')}: {len(records)} reviews")


if __name__ == "__main__":
    main()
