"""Visual question answering rows for training and evaluating a vision-language model (objective `vlm`).

A vision dataset folder (`workbench.data.vision`: diagram documents and captioned shapes, each image with a
caption and question/answer pairs) becomes one sample per (image, question): each QA pair of an image, and the
image's caption asked for with the prompt `caption` (PaliGemma's task-prefix convention; left out where a question
of type `caption` already asks for it). A sample is the PaliGemma row

    <image> x N   <|bos|>   question "\\n"   answer   <|eos|>
    '----------------- prefix -----------'   '--- suffix ---'

    prefix_len = N + 1 + len(question "\\n")   the slot where the suffix starts: image, bos and question attend
                                                to each other bidirectionally, the suffix causally (MaskSpec)
    labels[t]  = ids[t + 1]  where slot t + 1 is in the suffix (the answer and its eos), -100 elsewhere

so the loss is on the answer and its closing eos only. The question and the answer are tokenized apart
(`add_special_tokens=False`), which is how a prompt is tokenized at inference: the row a model trains on and the
prompt it answers at test time share their first prefix_len ids exactly. Rows are right-padded with <|pad|>
(`key_padding` masks the padding, `lengths` counts the real ids); a causal suffix never sees the padding after it.

Images. Each image is resized once to the model's `image_size` (bicubic, PIL, as
`workbench.inference.vlm.preprocess` does) and kept as uint8; a batch's
`pixel_values` are SigLIP's normalisation, x / 255 * 2 - 1 (mean = std = 0.5), (B, 3, S, S) float32.

Tokenizer. `vision_tokenizer` trains a byte-level BPE (`data_pipelines.tokenizer.train_bpe`: the reserved tokens
first, so `<image>` is id 11, which must be the model's `image_token_id`) on the train split's questions,
answers and captions, and writes it into the dataset folder as `vlm-tokenizer.json` beside a record of what it
was trained on (the train shards' sha256 and the vocabulary size); a folder rebuilt with other data or a run
asking for another size trains it again. `data.tokenizer` names a file to use instead.

Order. Sample g (the trainer's global data cursor) is sample perm_e[g mod N] with e = g div N, perm_e seeded by
(seed, e), like `workbench.data.examples`: any rank computes any sample from g alone, so a resumed run at any
world size continues exactly; the state is the split's fingerprint (its shards' sha256 and the tokenizer's),
checked on resume.

Exact match. `normalize` lowercases and collapses whitespace; an answer counts when the normalized decoded
completion (up to the first eos) equals the normalized truth. `greedy_answers` decodes a batch greedily with a
full forward per new token (no KV cache): each row's next id is written at its own length, so right-padded
prompts of different lengths decode together, and the prefix-LM mask gives exactly the logits a KV-cache decode
would (prefix bidirectional, suffix causal).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.data.packed import IGNORE_INDEX
from workbench.data.tokenizer import Tokenizer
from workbench.errors import DataError

CAPTION_PROMPT = "caption"  # the prefix that asks for an image's caption
CAPTION_TYPE = "caption"  # the question type of caption samples
TOKENIZER_FILE = "vlm-tokenizer.json"
TOKENIZER_RECORD = "vlm-tokenizer.source.json"


def normalize(text: str) -> str:
    """What exact match compares: lowercase, whitespace collapsed, ends stripped."""
    return " ".join(text.lower().split())


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> SigLIP's float input, x / 255 normalised with mean = std = 0.5: (x/255 - 0.5) / 0.5."""
    return images.float().div(255.0).sub(0.5).div(0.5)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) uint8 (bicubic when the size differs, as inference.vlm.preprocess)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if image.shape[:2] != (size, size):
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return np.ascontiguousarray(image.transpose(2, 0, 1))  # (3, S, S)


def qa_texts(examples) -> list[str]:
    """The texts a VLM tokenizer learns from: every caption, question and answer of the examples."""
    out = []
    for ex in examples:
        out.append(ex.caption)
        for qa in ex.qa:
            out += [qa["question"], qa["answer"]]
    return out


def _train_shards_sha(root: Path) -> list[str]:
    from workbench.data.vision import load_vision_manifest

    return [s["sha256"] for s in load_vision_manifest(root)["splits"].get("train", [])]


def vision_tokenizer(root: str | Path, vocab_size: int, log: Callable[[str], None] = print) -> Path:
    """The folder's VLM tokenizer (see the module notes): reused when it was trained on these train shards with
    this vocabulary size, trained (deterministically) otherwise. Returns its path."""
    from data_pipelines.tokenizer import train_bpe
    from workbench.data.vision import load_vision_split

    root = Path(root)
    path, record_path = root / TOKENIZER_FILE, root / TOKENIZER_RECORD
    source = {"train_shards_sha256": _train_shards_sha(root), "vocab_size": vocab_size}
    if path.is_file() and record_path.is_file():
        try:
            if json.loads(record_path.read_text()) == source:
                return path
        except (OSError, json.JSONDecodeError):
            pass
    texts = qa_texts(load_vision_split(root, "train"))
    tokenizer = train_bpe(texts, vocab_size)
    tokenizer.save(path)
    record_path.write_text(json.dumps(source) + "\n")
    log(f"tokenizer: a {tokenizer.vocab_size}-token BPE trained on the {len(texts)} captions, questions and answers "
        f"of {root}'s train split -> {path}")
    return path


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class VisionManifest:
    """What the trainer needs of a vision dataset folder (the shards' `Manifest` counterpart)."""

    root: Path
    tokenizer_path: Path
    tokenizer_sha256: str

    def tokens(self, split: str) -> int:  # rows are built per run; the trainer's "enough text" check passes
        return 1 << 62

    def documents(self, split: str) -> int:
        return 0


def prepare_vision_data(job, log: Callable[[str], None] = print) -> VisionManifest:
    """`data.dir` as a vision dataset folder (it must exist: `workbench diagrams DIR` builds one) and its
    tokenizer (`data.tokenizer`, or the folder's VLM tokenizer trained on first use)."""
    from workbench.data.vision import load_vision_manifest

    root = Path(job.data.dir)
    try:
        load_vision_manifest(root)
    except DataError as e:
        raise DataError(f"config key 'data.dir': {e}") from None
    if job.data.tokenizer:
        path = Path(job.data.tokenizer)
        if not path.is_file():
            raise DataError(f"config key 'data.tokenizer': {path} does not exist")
    else:
        path = vision_tokenizer(root, job.data.vocab_size, log)
    return VisionManifest(root, path, sha256_of(path))


@dataclass
class VQASample:
    index: int  # position among the split's samples
    image: int  # index of its image in the split
    type: str  # the question's type, or "caption"
    question: str
    answer: str
    prompt: np.ndarray  # <image> x N, <|bos|>, question "\n"
    target: np.ndarray  # answer, <|eos|>


def encode_prompt(tokenizer: Tokenizer, question: str, num_image_tokens: int, image_token_id: int) -> list[int]:
    """<image> x N, <|bos|>, the question and "\\n": the prefix of a row, and what a model answers at inference."""
    if tokenizer.bos_id is None:
        raise DataError("the tokenizer has no <|bos|>: use one built by data_pipelines.tokenizer")
    return ([image_token_id] * num_image_tokens + [tokenizer.bos_id]
            + tokenizer.encode(question + "\n", add_special_tokens=False))


class VQASet:
    """The (image, question, answer) samples of one split of a vision dataset folder (see the module notes)."""

    def __init__(self, root: str | Path, split: str, tokenizer: Tokenizer, *, num_image_tokens: int,
                 image_token_id: int, image_size: int, seq_len: int, seed: int = 0, shuffle: bool = True,
                 captions: bool = True, limit: int | None = None, option: str = "data.dir",
                 log: Callable[[str], None] = print):
        from workbench.data.vision import load_vision_manifest, load_vision_split

        self.root, self.split, self.seed, self.shuffle = Path(root), split, seed, shuffle
        tokenizer.require_reserved()
        if tokenizer.token_to_id("<image>") != image_token_id:
            raise DataError(f"config key 'model.image_token_id': {image_token_id}, but the tokenizer's <image> is id "
                            f"{tokenizer.token_to_id('<image>')}; they must agree")
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        try:
            self.examples = load_vision_split(self.root, split)
            shards = load_vision_manifest(self.root)["splits"][split]
        except DataError as e:
            raise DataError(f"config key '{option}': {e}") from None
        if not self.examples:
            raise DataError(f"config key '{option}': the {split} split of {self.root} holds no images")
        self.images = torch.from_numpy(np.stack([resize_image(ex.image, image_size) for ex in self.examples]))
        self.samples: list[VQASample] = []
        for i, ex in enumerate(self.examples):
            # the caption, asked for unless a question of the image already asks for it (shapes' "Describe ...")
            asked = any(qa.get("type") == CAPTION_TYPE for qa in ex.qa)
            pairs = [(CAPTION_TYPE, CAPTION_PROMPT, ex.caption)] if captions and not asked else []
            pairs += [(qa.get("type", "qa"), qa["question"], qa["answer"]) for qa in ex.qa]
            for kind, question, answer in pairs:
                prompt = encode_prompt(tokenizer, question, num_image_tokens, image_token_id)
                target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_id]
                if len(prompt) + len(target) > seq_len:
                    raise DataError(f"config key 'data.seq_len': {seq_len} is shorter than a row of {self.root}'s "
                                    f"{split} split ({len(prompt)} prompt + {len(target)} answer ids, image "
                                    f"{ex.id!r}: {question!r}); raise it")
                self.samples.append(VQASample(len(self.samples), i, kind, question, answer,
                                              np.asarray(prompt, dtype=np.int64), np.asarray(target, dtype=np.int64)))
        if limit is not None:
            self.samples = self.samples[:limit]
        digest = hashlib.sha256(json.dumps([s["sha256"] for s in shards]).encode())
        digest.update(json.dumps([tokenizer.backend.to_str(), num_image_tokens, image_size, captions]).encode())
        self.fingerprint = digest.hexdigest()
        self._order: tuple[int, np.ndarray] = (-1, np.arange(0))
        types = sorted({s.type for s in self.samples})
        log(f"{split}: {len(self.examples)} images of {self.root}, {len(self.samples)} samples ({', '.join(types)})")

    def __len__(self) -> int:
        return len(self.samples)

    def types(self) -> list[str]:
        return sorted({s.type for s in self.samples})

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            n = len(self.samples)
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
        return self._order[1]

    def sample(self, g: int) -> VQASample:
        """The sample at global index g (see the module notes)."""
        epoch, k = divmod(g, len(self.samples))
        return self.samples[int(self.order(epoch)[k])]

    def collate(self, samples: Sequence[VQASample]) -> dict:
        return collate_rows(samples, self.images, self.pad_id)

    def batches(self, size: int) -> list[dict]:
        """Every sample in order, `size` per batch (validation)."""
        return [self.collate(self.samples[s : s + size]) for s in range(0, len(self), size)]

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise DataError(f"config key 'data.dir': {self.root} is not the dataset this run was reading (its "
                            f"{self.split} shards, the tokenizer or the image size changed); resume needs the same data")


def collate_rows(samples: Sequence[VQASample], images: torch.Tensor, pad_id: int) -> dict:
    """Right-padded rows (see the module notes):
        input_ids (B, T), labels (B, T) shifted (the next id where it is in the suffix), lengths (B,),
        prefix_len (B,), pixel_values (B, 3, S, S) float, index (B,) the samples' positions, image (B,)."""
    B = len(samples)
    T = max(len(s.prompt) + len(s.target) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        row = np.concatenate([s.prompt, s.target])
        ids[b, : len(row)] = torch.from_numpy(row)
        p = len(s.prompt)
        # slot t predicts slot t + 1: the suffix's ids are the targets of slots p - 1 .. len - 2
        labels[b, p - 1 : len(row) - 1] = torch.from_numpy(s.target)
    image = torch.tensor([s.image for s in samples], dtype=torch.long)
    return {"input_ids": ids, "labels": labels,
            "lengths": torch.tensor([len(s.prompt) + len(s.target) for s in samples], dtype=torch.long),
            "prefix_len": torch.tensor([len(s.prompt) for s in samples], dtype=torch.long),
            "pixel_values": pixel_values(images[image]), "image": image,
            "index": torch.tensor([s.index for s in samples], dtype=torch.long)}


def prompt_batch(samples: Sequence[VQASample], images: torch.Tensor, pad_id: int) -> dict:
    """The prompts alone, right-padded: input_ids (B, T), lengths (B,) = prefix_len (B,), pixel_values."""
    B, T = len(samples), max(len(s.prompt) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s.prompt)] = torch.from_numpy(s.prompt)
    lengths = torch.tensor([len(s.prompt) for s in samples], dtype=torch.long)
    image = torch.tensor([s.image for s in samples], dtype=torch.long)
    return {"input_ids": ids, "lengths": lengths, "prefix_len": lengths.clone(),
            "pixel_values": pixel_values(images[image])}


def mask_of(batch: dict):
    """The prefix-LM mask of a right-padded batch (`lengths`, `prefix_len`): image, bos and question
    bidirectional, the suffix causal, the padding never attended."""
    from workbench.nn.attention import MaskSpec

    ids = batch["input_ids"]
    key_padding = torch.arange(ids.shape[1], device=ids.device)[None, :] < batch["lengths"][:, None]  # (B, T)
    return MaskSpec(prefix_len=batch["prefix_len"], key_padding=key_padding)


def model_logits(model: torch.nn.Module, blind: bool = False) -> Callable[[dict], torch.Tensor]:
    """`logits_fn` of a plain model (a paligemma2): its float32 logits (B, T, V) for a prompt batch; `blind`: every
    image replaced by the constant a blind run trained with (0 after normalisation, objective vlm)."""

    def logits_fn(batch: dict) -> torch.Tensor:
        pixels = torch.zeros_like(batch["pixel_values"]) if blind else batch["pixel_values"]
        out = model({"input_ids": batch["input_ids"], "pixel_values": pixels, "mask": mask_of(batch)})
        return model.logits(out.hidden).float()

    return logits_fn


def answer_stops(tokenizer: Tokenizer, image_token_id: int) -> list[int]:
    """The ids an answer ends at: the tokenizer's eos ids, and the <image> placeholder (a model that emits it inside
    its answer has no image to put there; both decoders stop at it alike)."""
    return sorted(set(tokenizer.eos_ids) | {image_token_id})


@torch.no_grad()
def answer_samples(model: torch.nn.Module, samples: Sequence[VQASample], images: torch.Tensor, tokenizer: Tokenizer,
                   max_new_tokens: int, batch_size: int, blind: bool = False, progress: str | None = None) -> list[str]:
    """Greedy answers (decoded text, up to the first eos) of a plain model to `samples` about `images` (uint8
    (N, 3, S, S): the split's, or noise), `batch_size` prompts at a time, through the KV-cache generator
    (`workbench.inference.vlm.generate`: the same ids as `greedy_answers`, tested, in one prefill and one token per
    step); `blind`: every image replaced by the constant a blind run trained with (0 after normalisation)."""
    from tqdm import tqdm

    from workbench.inference.vlm import generate

    device = next(model.parameters()).device
    stops = answer_stops(tokenizer, model.cfg.image_token_id)
    out: list[str] = []
    for s in tqdm(range(0, len(samples), batch_size), desc=progress, disable=progress is None, leave=False):
        chunk = samples[s : s + batch_size]
        pixels = pixel_values(images[[x.image for x in chunk]]).to(device)
        if blind:
            pixels = torch.zeros_like(pixels)
        ids = generate(model, [x.prompt.tolist() for x in chunk], pixels, max_new_tokens=max_new_tokens,
                       eos_ids=stops, pad_id=tokenizer.pad_id)
        out += [tokenizer.decode([t for t in row if t not in stops]) for row in ids]
    return out


@torch.no_grad()
def greedy_answers(logits_fn: Callable[[dict], torch.Tensor], batch: dict, max_new_tokens: int,
                   eos_ids: Sequence[int], pad_id: int) -> list[list[int]]:
    """Greedy completions of a `prompt_batch` (see the module notes): `logits_fn(batch)` -> (B, T, V) for a batch
    with input_ids, lengths, prefix_len, pixel_values. Each list ends before the first eos id (not included)."""
    ids, lengths = batch["input_ids"], batch["lengths"].clone()
    B = ids.shape[0]
    ids = torch.cat([ids, torch.full((B, max_new_tokens), pad_id, dtype=ids.dtype, device=ids.device)], 1)
    rows = torch.arange(B, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    out: list[list[int]] = [[] for _ in range(B)]
    eos = torch.tensor(sorted(eos_ids), device=ids.device)
    for _ in range(max_new_tokens):
        T = int(lengths.max())
        logits = logits_fn({**batch, "input_ids": ids[:, :T], "lengths": lengths})  # (B, T, V)
        nxt = logits[rows, lengths - 1].argmax(-1)  # (B,) each row's next id, from its last real slot
        stop = torch.isin(nxt, eos)
        for b in (~done & ~stop).nonzero().flatten().tolist():
            out[b].append(int(nxt[b]))
        done |= stop
        if bool(done.all()):
            break
        ids[rows, lengths] = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        lengths = lengths + (~done).long()
    return out
