"""Synthetic long-context tasks: passkey retrieval, needle in a haystack, RULER-style multi-key retrieval and
variable tracking, as plain text with known answers, exact scoring rules and exact chance.

Every generator takes a `random.Random` and returns text: no tokenizer is needed to generate. A sample is
drawn in two steps, its content (keys, values, depths: `*_spec`) and then its text around `n` units of
haystack (`render`), so `fit_sample` can bisect `n` until the encoded prompt fills a token budget without
exceeding it, keeping the content fixed. The eval tasks (`evals/tasks/passkey.py`, `niah.py`,
`ruler_multikey.py`, `variable_tracking.py`) and training recipes that teach retrieval (`passkey_document`)
share them. A haystack is filler sentences (`FILLER`, joined by spaces) or lines of real text such as a
run's held-out documents (`text_haystack`, joined by newlines), cycled when too short; needles go in as
units of their own at unit boundaries, so they never split a sentence or a line.

Passkey (Mohtashami & Jaggi 2023, "Landmark Attention"): a number hidden in repetitive filler

    The grass is green. The sky is blue. ... The pass key is 48213. Remember it. 48213 is the pass key.
    The sun is yellow. ... What is the pass key? The pass key is| 48213

The needle goes at the boundary nearest fraction `depth` of the filler (0 = before the first sentence,
1 = after the last). Needle in a haystack (Kamradt 2023) is the same with "The special magic number for
{key} is: {value}." inside any haystack.

    scoring   the first run of digits in the output equals the value (exact); per digit, position i of that
              run equals the value's digit i (missing digits are wrong)
    chance    a uniformly random number of the same form (`digits` digits, first non-zero):
              exact 1 / (9 * 10^(digits-1)) (about 10^-digits), per digit (1/9 + (digits-1)/10) / digits

Multi-key NIAH (RULER, Hsieh et al. 2024, "niah_multikey" / "niah_multivalue"): needles "One of the
special magic numbers for {key} is: {value}." for `n_keys` distinct keys (one asked for, the others
distractors) at random depths; the asked key has `n_values` needles with distinct values.

    scoring   every value of the asked key appears in the output as a run of digits (RULER's all-present
              rule); recall is the fraction that appears
    chance    a guess of n_values distinct random numbers of the same form, S = 9 * 10^(digits-1) of them:
              exact 1 / C(S, n_values), recall n_values / S. A distractor's value scores 0.

Variable tracking (RULER "vt"): `n_chains` chains "VAR QWERT = 12345." "VAR ASDFG = QWERT." ... of
1 + n_hops assignments each (one value per chain, five-letter names), at random depths with each chain in
order; the question asks which variables are assigned chain 0's value.

    scoring   the set of five-capital-letter names in the output equals chain 0's names (exact); recall is
              the fraction of them present (RULER reports recall)
    chance    a guess of h = 1 + n_hops distinct names among the m = n_chains * h names in the text:
              exact 1 / C(m, h), recall h / m

Design choices: text, not tokens, so one generator serves every tokenizer; one `random.Random` per sample
(the tasks seed it from the eval seed and the sample's cell), so a cell's samples do not change when
other cells are added; the question always follows the context and the answer is the next tokens, so
greedy decoding of a few tokens scores it. Differences from RULER: our question/answer templates are
shorter, keys are adjective-noun words rather than UUIDs, and chance is stated exactly instead of omitted.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER_SENTENCES: tuple[str, ...] = tuple(s.strip() + "." for s in FILLER.split(".") if s.strip())
PASSKEY_QUESTION = " What is the pass key? The pass key is"
DIGITS_RE = re.compile(r"\d+")


# ----------------------------------------------------------------------------------------------- helpers
def random_number(rng: random.Random, digits: int) -> str:
    """`digits` uniform decimal digits, the first non-zero (so the number has exactly `digits` digits)."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    return str(rng.randint(1, 9)) + "".join(str(rng.randrange(10)) for _ in range(digits - 1))


def number_space(digits: int) -> int:
    """How many numbers `random_number` can draw: 9 * 10^(digits-1)."""
    return 9 * 10 ** (digits - 1)


def filler_sentences(n: int) -> list[str]:
    """The first `n` sentences of FILLER repeated."""
    return [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(n)]


def insert_at_depth(units: Sequence[str], needle: str, depth: float) -> tuple[list[str], int]:
    """(units with `needle` inserted at the boundary nearest fraction `depth`, the index it went to)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    # boundary k of n units: k / n is the fraction of the haystack before the needle
    k = round(depth * len(units))
    return list(units[:k]) + [needle] + list(units[k:]), k


def first_number(text: str) -> str | None:
    """The first run of digits in `text` (the model's answer), or None."""
    m = DIGITS_RE.search(text)
    return m.group(0) if m else None


def digit_accuracy(predicted: str | None, answer: str) -> float:
    """Fraction of the answer's digit positions the prediction gets right (missing digits are wrong)."""
    pred = predicted or ""
    return sum(1 for i, d in enumerate(answer) if i < len(pred) and pred[i] == d) / len(answer)


def number_chance(digits: int) -> tuple[float, float]:
    """(exact-match chance, per-digit chance) of a uniformly random `digits`-digit answer (first digit 1-9):
    1 / (9 * 10^(digits-1)); per digit (1/9 + (digits-1)/10) / digits."""
    return 1.0 / number_space(digits), (1.0 / 9 + (digits - 1) / 10) / digits


def fit_budget(build: Callable[[int], str], count: Callable[[str], int], n_tokens: int,
               what: str = "prompt") -> tuple[int, str, int]:
    """(n, build(n), count(build(n))) for the largest n >= 0 whose text has at most `n_tokens` tokens.

    Token counts grow with n (a BPE merges across a boundary at most a token or two, so the count is
    monotone up to that jitter): bisection finds the boundary, then a short scan upward catches a larger n
    that still fits after a merge."""
    base = count(build(0))
    if base > n_tokens:
        raise ValueError(f"the {what} without filler already has {base} tokens, more than the budget of "
                         f"{n_tokens}: raise the length")
    lo, hi = 0, 1
    while count(build(hi)) <= n_tokens:  # lo fits, find an hi that does not
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(build(mid)) <= n_tokens:
            lo = mid
        else:
            hi = mid
    for step in (1, 2):  # jitter: one more unit can cost fewer tokens than a merge saved
        if count(build(lo + step)) <= n_tokens:
            lo = lo + step
    text = build(lo)
    return lo, text, count(text)


def _encode_len(tokenizer) -> Callable[[str], int]:
    return lambda text: len(tokenizer.encode(text))


# ----------------------------------------------------------------------------------------------- passkey
def passkey_needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _passkey_context(key: str, n_filler_sentences: int, depth: float) -> str:
    units, _ = insert_at_depth(filler_sentences(n_filler_sentences), passkey_needle(key), depth)
    return " ".join(units)


def passkey_parts(rng: random.Random, n_filler_sentences: int, depth: float, digits: int = 5) -> tuple[str, str, str]:
    """(context, question, answer). context: filler sentences with the needle sentence
    'The pass key is 48213. Remember it. 48213 is the pass key.' inserted at the sentence boundary nearest
    fraction `depth` (0 = start, 1 = end); question: ' What is the pass key? The pass key is';
    answer: ' 48213' (a leading space, `digits` random digits, first digit non-zero)."""
    if n_filler_sentences < 0:
        raise ValueError(f"n_filler_sentences must be >= 0, got {n_filler_sentences}")
    key = random_number(rng, digits)
    return _passkey_context(key, n_filler_sentences, depth), PASSKEY_QUESTION, " " + key


def passkey_document(rng: random.Random, n_filler_sentences: int, depth: float | None = None,
                     digits: int = 5) -> str:
    """context + question + answer as one training document (depth uniform in [0, 1] when None)."""
    if depth is None:
        depth = rng.random()
    return "".join(passkey_parts(rng, n_filler_sentences, depth, digits))


def fit_passkey(rng: random.Random, tokenizer, n_tokens: int, depth: float, digits: int = 5,
                count: Callable[[str], int] | None = None) -> dict:
    """{"prompt": context + question, "answer": answer, "depth": depth, "n_tokens": len(encode(prompt))}
    with the number of filler sentences chosen so the encoded prompt is as close to n_tokens as possible
    without exceeding it. `encode` is the tokenizer's default (special tokens included: what the model
    reads), or `count` when given. Also "n_filler_sentences". One key is drawn from `rng`, then the filler is
    sized around it."""
    key = random_number(rng, digits)
    n, prompt, used = fit_budget(lambda k: _passkey_context(key, k, depth) + PASSKEY_QUESTION,
                                 count or _encode_len(tokenizer), n_tokens, "passkey prompt")
    return {"prompt": prompt, "answer": " " + key, "depth": depth, "n_tokens": used, "n_filler_sentences": n}


# ------------------------------------------------------------------------------------------------ haystacks
@dataclass(frozen=True)
class Haystack:
    """Units of text (sentences or lines), cycled to any length and joined by `sep`."""

    units: tuple[str, ...]
    sep: str = " "
    name: str = "filler"

    def take(self, n: int) -> list[str]:
        return [self.units[i % len(self.units)] for i in range(n)]


FILLER_HAYSTACK = Haystack(FILLER_SENTENCES, " ", "filler")


def text_haystack(texts: Sequence[str], name: str = "text", max_units: int = 200_000) -> Haystack:
    """A haystack of the non-blank lines of `texts` (trailing spaces dropped), in order, joined by newlines;
    digit-free lines only, so a number in the output can only come from a needle."""
    units: list[str] = []
    for text in texts:
        units += [ln.rstrip() for ln in text.splitlines() if ln.strip() and not any(c.isdigit() for c in ln)]
        if len(units) >= max_units:
            break
    if not units:
        raise ValueError(f"haystack {name!r}: the texts have no non-blank digit-free lines")
    return Haystack(tuple(units[:max_units]), "\n", name)


def place(haystack: Haystack, n: int, needles: Sequence[tuple[float, str]]) -> str:
    """`n` haystack units with each (depth, needle) inserted at the boundary nearest depth * n (needles at
    the same boundary keep their order)."""
    units = haystack.take(n)
    # boundary k of n units: k / n of the haystack precedes the needle
    at = sorted(((round(d * n), i, text) for i, (d, text) in enumerate(needles)))
    out, prev = [], 0
    for k, _, text in at:
        out += units[prev:k] + [text]
        prev = k
    return haystack.sep.join(out + units[prev:])


# -------------------------------------------------------------------------------------------------- kinds
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "misty", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy", "vivid", "witty")
NOUNS = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jungle",
         "kettle", "lantern", "meadow", "nectar", "orchid", "pebble", "quarry", "river", "saddle", "tunnel",
         "violin", "walnut")
KEYS: tuple[str, ...] = tuple(f"{a}-{n}" for a in ADJECTIVES for n in NOUNS)
NAME_RE = re.compile(r"\b[A-Z]{5}\b")


@dataclass(frozen=True)
class Kind:
    """One task kind: `render(spec, haystack, n) -> (context, question, answer)` around n haystack units."""

    name: str
    render: Callable[[dict, Haystack, int], tuple[str, str, str]]


def niah_spec(rng: random.Random, depth: float, digits: int = 7) -> dict:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return {"key": rng.choice(KEYS), "value": random_number(rng, digits), "depth": depth}


def _niah_render(spec: dict, haystack: Haystack, n: int) -> tuple[str, str, str]:
    needle = f"The special magic number for {spec['key']} is: {spec['value']}."
    question = (f"{haystack.sep}What is the special magic number for {spec['key']} mentioned in the text above? "
                f"The special magic number for {spec['key']} is")
    return place(haystack, n, [(spec["depth"], needle)]), question, " " + spec["value"]


def multikey_spec(rng: random.Random, n_keys: int = 4, n_values: int = 1, digits: int = 7) -> dict:
    """The asked key (keys[0]) with `n_values` values, and n_keys - 1 distractor keys with one value each,
    every value distinct, every needle at a uniform random depth."""
    if n_keys < 1 or n_values < 1 or n_keys > len(KEYS) or n_keys - 1 + n_values > number_space(digits):
        raise ValueError(f"multikey: need 1 <= n_keys <= {len(KEYS)}, n_values >= 1 and enough {digits}-digit "
                         f"values, got n_keys={n_keys}, n_values={n_values}")
    keys = rng.sample(KEYS, n_keys)
    values: list[str] = []
    while len(values) < n_keys - 1 + n_values:
        v = random_number(rng, digits)
        if v not in values:
            values.append(v)
    needles = [(keys[0], v) for v in values[:n_values]] + list(zip(keys[1:], values[n_values:]))
    return {"key": keys[0], "values": values[:n_values], "distractors": dict(zip(keys[1:], values[n_values:])),
            "needles": [(rng.random(), k, v) for k, v in needles]}


def _multikey_render(spec: dict, haystack: Haystack, n: int) -> tuple[str, str, str]:
    needles = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in spec["needles"]]
    key, values = spec["key"], spec["values"]
    if len(values) == 1:
        question = (f"{haystack.sep}What is the special magic number for {key} mentioned in the text above? "
                    f"The special magic number for {key} is")
    else:
        question = (f"{haystack.sep}What are all the special magic numbers for {key} mentioned in the text above? "
                    f"The special magic numbers for {key} are")
    return place(haystack, n, needles), question, " " + ", ".join(values)


def vt_spec(rng: random.Random, n_chains: int = 1, n_hops: int = 4, digits: int = 5) -> dict:
    """`n_chains` chains of 1 + n_hops distinct five-letter names, one distinct value per chain; each
    assignment at a uniform random depth, sorted within its chain so each chain reads in order."""
    if n_chains < 1 or n_hops < 0:
        raise ValueError(f"variable tracking: need n_chains >= 1 and n_hops >= 0, got {n_chains}, {n_hops}")
    names: list[str] = []
    while len(names) < n_chains * (1 + n_hops):
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    chains = [names[c * (1 + n_hops) : (c + 1) * (1 + n_hops)] for c in range(n_chains)]
    values: list[str] = []
    while len(values) < n_chains:
        v = random_number(rng, digits)
        if v not in values:
            values.append(v)
    statements = []
    for chain, value in zip(chains, values):
        depths = sorted(rng.random() for _ in chain)
        sources = [value] + chain[:-1]  # X1 = value, X2 = X1, ...
        statements += [(d, f"VAR {name} = {src}.") for d, name, src in zip(depths, chain, sources)]
    return {"names": chains[0], "value": values[0], "all_names": names, "statements": statements}


def _vt_render(spec: dict, haystack: Haystack, n: int) -> tuple[str, str, str]:
    v = spec["value"]
    question = (f"{haystack.sep}Which variables are assigned the value {v} in the text above? "
                f"The variables assigned the value {v} are")
    return place(haystack, n, spec["statements"]), question, " " + " ".join(spec["names"])


PASSKEY = Kind("passkey", lambda spec, _h, n: (_passkey_context(spec["key"], n, spec["depth"]), PASSKEY_QUESTION,
                                                " " + spec["key"]))
NIAH = Kind("niah", _niah_render)
MULTIKEY = Kind("multikey", _multikey_render)
VARIABLE_TRACKING = Kind("variable_tracking", _vt_render)


# ------------------------------------------------------------------------------------------------ scoring
def score_number(output: str, answer: str) -> tuple[bool, float]:
    """(exact, per-digit accuracy) of the first run of digits in `output` against `answer` (passkey, NIAH)."""
    value = answer.strip()
    found = first_number(output)
    return found == value, digit_accuracy(found, value)


def score_values(output: str, values: Sequence[str]) -> tuple[bool, float]:
    """(every value present, fraction present) among the runs of digits in `output` (multi-key)."""
    found = set(DIGITS_RE.findall(output))
    hits = sum(v in found for v in values)
    return hits == len(values), hits / len(values)


def score_names(output: str, names: Sequence[str]) -> tuple[bool, float]:
    """(the five-capital-letter names in `output` are exactly `names`, fraction of `names` present)."""
    found = set(NAME_RE.findall(output))
    return found == set(names), len(found & set(names)) / len(names)


def multikey_chance(digits: int, n_values: int) -> tuple[float, float]:
    """(exact, recall) of a guess of n_values distinct random numbers: 1 / C(S, n_values), n_values / S."""
    space = number_space(digits)
    return 1.0 / math.comb(space, n_values), n_values / space


def vt_chance(n_chains: int, n_hops: int) -> tuple[float, float]:
    """(exact, recall) of a guess of h = 1 + n_hops distinct names among the m = n_chains * h in the text."""
    h = 1 + n_hops
    m = n_chains * h
    return 1.0 / math.comb(m, h), h / m


def fit_sample(kind: Kind, spec: dict, haystack: Haystack, n_tokens: int, count: Callable[[str], int]) -> dict:
    """{"prompt", "answer", "n_tokens", "n_units", **spec}: the sample of `spec` around the largest haystack
    whose prompt (context + question) has at most `n_tokens` tokens by `count`."""
    n, prompt, used = fit_budget(lambda k: "".join(kind.render(spec, haystack, k)[:2]), count, n_tokens,
                                 f"{kind.name} prompt")
    answer = kind.render(spec, haystack, 0)[2]
    return {"prompt": prompt, "answer": answer, "n_tokens": used, "n_units": n, **spec}
