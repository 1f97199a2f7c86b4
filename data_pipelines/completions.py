"""Prompt/answer pairs mined from held-out text: finish the line (greedy exact-match data for code models).

For a document, a line with enough text is cut at a word boundary (just before a space or one of
`( [ . = , :`, after the indentation, leaving 3 to 40 characters); the prompt is up to `context_chars`
characters before the cut, the answer the rest of the line. Cutting before a boundary keeps the prompt
ending where a byte-level BPE ends a token anyway, so the model is not asked to continue half a token.
Pairs come from the held-out split, so the model never trained on the lines it must finish.

    {"prompt": "...\\n    def __init__(self", "answer": ", name, value):", "source": "val-000000/00017", "line": 41}
"""

from __future__ import annotations

import random
from collections.abc import Sequence

BOUNDARY = " ([.=,:"


def line_completions(docs: Sequence[tuple[str, str]], n: int, seed: int = 0, context_chars: int = 400,
                     min_answer: int = 3, max_answer: int = 40) -> list[dict]:
    """Up to `n` pairs from (key, text) documents, reproducible from `seed`, at most one per line."""
    candidates = []
    for key, text in docs:
        offset = 0
        for i, line in enumerate(text.split("\n")):
            indent = len(line) - len(line.lstrip())
            cuts = [c for c in range(indent + 1, len(line) - min_answer + 1)
                    if line[c] in BOUNDARY and len(line) - c <= max_answer and line[c - 1] != " "]
            if cuts and len(line.strip()) >= min_answer + 3:
                candidates.append((key, i, offset, line, cuts))
            offset += len(line) + 1
    rng = random.Random(seed)
    picked = rng.sample(candidates, min(n, len(candidates)))
    out = []
    texts = dict(docs)
    for key, i, offset, line, cuts in sorted(picked, key=lambda c: (c[0], c[1])):
        cut = rng.choice(cuts)
        start = max(0, offset + cut - context_chars)
        out.append({"prompt": texts[key][start : offset + cut], "answer": line[cut:], "source": key, "line": i + 1})
    return out
