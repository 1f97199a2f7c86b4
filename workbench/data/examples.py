"""Post-training examples: a jsonl of conversations or preference pairs, tokenized once, read by the global index.

    conversations   {"messages": [{"role", "content"}, ...]}  or  {"prompt", "response"[, "system"]}
    pairs           {"prompt": str or messages, "chosen": str, "rejected": str}
    prompts         {"prompt": str or messages, ...}: what RL (ppo, grpo) samples completions for; the other keys
                    (a reasoning problem's kind and params) are what the reward reads

`ExampleSet(path, kind, template, seq_len)` reads and tokenizes the whole file through the chat template
(`workbench.data.chat`): a conversation becomes its ids and target mask (the assistant's tokens); a pair
becomes the prompt's ids (ending with `<|assistant|>`) and each completion's ids (ending with `<|end|>`). Any
other key of a record is kept in `meta` for the eval harness and ignored here. Errors name the file, the line
and the field. An example longer than `seq_len + 1` tokens keeps its start (a pair keeps its prompt and cuts
both completions); one left without a target, a pair whose prompt alone fills the window, or a pair whose two
completions are equal once cut, is dropped; both counts are logged when the file is read. A text that spells out
a structural reserved token (`<|end|>`, a role token) is refused (`workbench.data.chat.check_text`).

Order. Sample g (the trainer's global data cursor, `workbench.data.cursor`) is example
perm_e[g mod N] with e = g div N and perm_e a permutation seeded by (seed, e): every epoch visits every
example once in a fresh order, any rank computes any sample from g alone, and a resumed run (at any world
size) continues exactly; the state is the file's fingerprint, checked on resume.

Batches (`collate`)
    conversations, padded   one row per conversation, right-padded to the longest of the micro-batch: a causal
                            model's real tokens never see the padding after them
    conversations, packed   (`pack=True`) conversations placed first-fit (longest first) into rows of
                            `seq_len` tokens, with document ids, so attention stays inside a conversation and
                            RoPE positions restart at each one; padding after the last one
    pairs                   2B rows, the B chosen completions after their prompts, then the B rejected ones,
                            right-padded: one forward serves both sides of every pair (DPO)
    prompts                 `index` and `examples` (the Example objects themselves): the RL objectives generate
                            from the prompt ids and score with the meta, then build their own rows
Each batch holds `input_ids`, `labels` (the next token where it is a target, -100 elsewhere), `positions`,
`index` (the example's position among the file's kept examples) and `lengths` (real tokens per row); packed
batches add
`document_ids`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench.data.chat import ChatTemplate, check_messages, check_text, messages_of
from workbench.data.packed import IGNORE_INDEX
from workbench.errors import DataError

KINDS = ("chat", "pairs", "prompts")


@dataclass
class Example:
    index: int  # the record's position among the file's kept examples
    ids: np.ndarray  # conversations: the whole conversation; pairs: the prompt
    targets: np.ndarray | None = None  # conversations: which ids are trained
    chosen: np.ndarray | None = None  # pairs: the completions, each ending with <|end|>
    rejected: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def jsonl_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) of every non-empty line of an existing jsonl file: the one reader of the project's
    jsonl data (training examples, eval data, the data makers' mixes). A line that is not UTF-8, not JSON or not
    an object is an error naming the file and the line."""
    p = Path(path)
    out = []
    with open(p, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{i}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{p}:{i}: expected a JSON object, got {type(rec).__name__}")
            out.append((i, rec))
    return out


def read_jsonl(path: str | Path, option: str) -> list[tuple[int, dict]]:
    """(line number, record) for every non-empty line; errors name the option, the file and the line."""
    p = Path(path)
    if not p.is_file():
        state = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise DataError(f"config key '{option}': {p} {state}")
    out = jsonl_records(p)
    if not out:
        raise DataError(f"config key '{option}': {p} holds no records")
    return out


def _prompt_messages(prompt, where: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    check_messages(prompt, f"{where}: 'prompt'")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: 'prompt' ends with an assistant turn; the completions are that turn")
    return prompt


class ExampleSet:
    """The tokenized examples of one jsonl file (see the module notes)."""

    def __init__(self, path: str | Path, kind: str, template: ChatTemplate, seq_len: int, *, seed: int = 0,
                 shuffle: bool = True, train_on: str = "assistant", pack: bool = False,
                 option: str = "data.train_file", log: Callable[[str], None] = print):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.path, self.kind, self.template, self.seq_len = Path(path), kind, template, seq_len
        self.seed, self.shuffle, self.pack = seed, shuffle, pack
        self._order: tuple[int | None, np.ndarray | None] = (None, None)  # (epoch, its order): see order()
        self.pad_id = template.tokenizer.pad_id if template.tokenizer.pad_id is not None else 0
        records = read_jsonl(path, option)
        self.examples: list[Example] = []
        self.truncated = self.dropped = 0
        for line, rec in records:
            where = f"{self.path}:{line}"
            if kind == "chat":
                ex = self._conversation(rec, where, train_on)
            else:
                ex = self._pair(rec, where) if kind == "pairs" else self._prompt(rec, where)
            if ex is not None:
                ex.index = len(self.examples)
                self.examples.append(ex)
        if not self.examples:
            raise DataError(f"config key '{option}': no example of {self.path} fits data.seq_len = {seq_len} "
                            f"({self.dropped} dropped)")
        self.fingerprint = hashlib.sha256(self.path.read_bytes()).hexdigest()
        what = {"chat": "conversations", "pairs": "preference pairs", "prompts": "prompts"}[kind]
        cut = f"; {self.truncated} cut to data.seq_len + 1 = {seq_len + 1} tokens" if self.truncated else ""
        why = "no room for a completion" if kind == "prompts" else "no target within the window"
        dropped = f"; {self.dropped} dropped ({why})" if self.dropped else ""
        log(f"{self.path}: {len(self.examples)} {what}{cut}{dropped}")

    # --- reading

    def _conversation(self, rec: dict, where: str, train_on: str) -> Example | None:
        messages = messages_of(rec, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: a training conversation needs at least one assistant turn")
        enc = self.template.encode(messages, train_on)
        ids, targets = enc.ids, enc.targets
        if len(ids) > self.seq_len + 1:
            ids, targets = ids[: self.seq_len + 1], targets[: self.seq_len + 1]
            self.truncated += 1
        if not any(targets[1:]):  # token 0 is never predicted
            self.dropped += 1
            return None
        meta = {k: v for k, v in rec.items() if k not in ("messages", "prompt", "response", "system")}
        return Example(0, np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool), meta=meta)

    def _pair(self, rec: dict, where: str) -> Example | None:
        for key in ("prompt", "chosen", "rejected"):
            if key not in rec:
                raise DataError(f"{where}: missing key {key!r} (a preference pair has prompt, chosen, rejected)")
        for key in ("chosen", "rejected"):
            if not isinstance(rec[key], str) or not rec[key]:
                raise DataError(f"{where}: {key!r} must be a non-empty string")
            check_text(rec[key], f"{where}: {key!r}")
        if rec["chosen"] == rec["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same text; a pair must differ")
        prompt = self.template.prompt_ids(_prompt_messages(rec["prompt"], where))
        room = self.seq_len + 1 - len(prompt)
        if room < 2:  # at least one completion token and its <|end|>
            self.dropped += 1
            return None
        end = [self.template.end_id]
        sides = [self.template.tokenizer.encode(rec[k], add_special_tokens=False) + end for k in ("chosen", "rejected")]
        if any(len(s) > room for s in sides):
            self.truncated += 1
        chosen, rejected = (np.asarray(s[:room], dtype=np.int64) for s in sides)
        if np.array_equal(chosen, rejected):  # they differed only past the window: nothing left to prefer
            self.dropped += 1
            return None
        meta = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
        return Example(0, np.asarray(prompt, dtype=np.int64), chosen=chosen, rejected=rejected, meta=meta)

    def _prompt(self, rec: dict, where: str) -> Example | None:
        if "prompt" not in rec:
            raise DataError(f"{where}: missing key 'prompt' (an RL prompt record has a prompt, and what its reward "
                            f"reads)")
        if isinstance(rec["prompt"], str) and not rec["prompt"]:
            raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of messages")
        ids = self.template.prompt_ids(_prompt_messages(rec["prompt"], where))
        if len(ids) >= self.seq_len:  # no room left in the window for a completion
            self.dropped += 1
            return None
        meta = {k: v for k, v in rec.items() if k not in ("prompt", "messages")}
        return Example(0, np.asarray(ids, dtype=np.int64), meta=meta)

    # --- the global index

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of the examples (the last one asked for is kept: samples come epoch by epoch)."""
        if self._order[0] != epoch:
            n = len(self.examples)
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
        return self._order[1]

    def sample(self, g: int) -> Example:
        """The example at global sample index g (see the module notes)."""
        epoch, k = divmod(g, len(self.examples))
        return self.examples[int(self.order(epoch)[k])]

    def batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        """The collated examples at these positions of the file (no shuffling): validation, precomputation."""
        return self.collate([self.examples[i] for i in indices])

    def batches(self, size: int) -> list[dict[str, torch.Tensor]]:
        """Every example in file order, `size` per batch."""
        return [self.batch(range(s, min(len(self), s + size))) for s in range(0, len(self), size)]

    def collate(self, samples: Sequence[Example]) -> dict:
        if self.kind == "prompts":
            return {"index": torch.tensor([s.index for s in samples], dtype=torch.long), "examples": list(samples)}
        if self.kind == "pairs":
            return collate_pairs(samples, self.pad_id)
        return collate_chat(samples, self.pad_id, self.seq_len if self.pack else None)

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise DataError(f"{self.path} is not the file this run was reading (its contents changed); resume "
                            f"needs the same examples")


# ---------------------------------------------------------------------------------------------------- batches


def label_rows(seqs: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows from (ids, targets) pairs: inputs ids[:-1], labels ids[1:] where targets[1:]."""
    T = max(len(ids) for ids, _ in seqs) - 1
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, targets) in enumerate(seqs):
        n = len(ids) - 1
        input_ids[b, :n] = torch.from_numpy(ids[:-1])
        labels[b, :n] = torch.from_numpy(np.where(targets[1:], ids[1:], IGNORE_INDEX))
    lengths = torch.tensor([len(ids) - 1 for ids, _ in seqs])
    return {"input_ids": input_ids, "labels": labels, "positions": torch.arange(T).expand(len(seqs), T).contiguous(),
            "lengths": lengths}


def collate_chat(samples: Sequence[Example], pad_id: int, pack_len: int | None = None) -> dict[str, torch.Tensor]:
    """Conversations as right-padded rows, or (pack_len) packed first-fit into rows of pack_len tokens."""
    index = torch.tensor([s.index for s in samples])
    if pack_len is None:
        return {**label_rows([(s.ids, s.targets) for s in samples], pad_id), "index": index}
    # first-fit, longest first: each conversation contributes len(ids) - 1 input positions
    rows: list[list[Example]] = []
    room: list[int] = []
    for s in sorted(samples, key=lambda s: (-len(s.ids), s.index)):
        n = len(s.ids) - 1
        r = next((i for i, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([]), room.append(pack_len)
            r = len(rows) - 1
        rows[r].append(s)
        room[r] -= n
    T = max(pack_len - free for free in room)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    docs = torch.full((B, T), -1, dtype=torch.long)  # padding is a document of its own
    positions = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d, s in enumerate(row):
            n = len(s.ids) - 1
            input_ids[b, at : at + n] = torch.from_numpy(s.ids[:-1])
            labels[b, at : at + n] = torch.from_numpy(np.where(s.targets[1:], s.ids[1:], IGNORE_INDEX))
            docs[b, at : at + n] = d
            positions[b, at : at + n] = torch.arange(n)
            at += n
    lengths = torch.tensor([pack_len - free for free in room])
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "document_ids": docs,
            "lengths": lengths, "index": index}


def collate_pairs(samples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded rows: prompt + chosen for each pair, then prompt + rejected; targets on the completions."""
    seqs = []
    for side in ("chosen", "rejected"):
        for s in samples:
            completion = getattr(s, side)
            ids = np.concatenate([s.ids, completion])
            targets = np.concatenate([np.zeros(len(s.ids), dtype=bool), np.ones(len(completion), dtype=bool)])
            seqs.append((ids, targets))
    return {**label_rows(seqs, pad_id), "index": torch.tensor([s.index for s in samples])}


def build_example_sets(job, kind: str, tokenizer, log: Callable[[str], None] = print):
    """(train set, validation set or None) of `job.data.train_file` / `val_file` read as `kind`."""
    template = ChatTemplate(tokenizer)
    d = job.data
    common = {"template": template, "seq_len": d.seq_len, "train_on": d.train_on, "pack": d.pack, "log": log}
    train = ExampleSet(d.train_file, kind, seed=job.run.seed, option="data.train_file", **common)
    val = ExampleSet(d.val_file, kind, shuffle=False, option="data.val_file", **common) if d.val_file else None
    return train, val
