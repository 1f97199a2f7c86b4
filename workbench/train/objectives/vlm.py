"""Vision-language fine-tuning (objective `vlm`): a PaliGemma-style model answering questions about images.

    loss = - sum_{b, t : t + 1 in the suffix of row b} log p(y[b, t+1] | image_b, y[b, <=t])  /  N_step,
    N_step = the step's number of target tokens (answers and their eos, every micro-batch on every rank)

Rows (`workbench.data.vqa`): `<image> x N <|bos|> question "\\n" answer <|eos|>`, one per (image, question) of a
vision dataset folder (`data.dir`) and one per image asking `caption`; targets are the answer and its eos only.
The mask is PaliGemma's prefix-LM (`MaskSpec(prefix_len=...)`): image slots, bos and question see each other
bidirectionally, the answer causally; right padding is masked by `key_padding`. Normalising the summed loss by
the step's global target count (like lm and sft) makes every layout and accumulation depth give the same loss.

Which parts train (`objective.train_parts`): PaliGemma's recipe is a frozen pretrained image encoder and language
model and a projector learned alone first (a warm-up that aligns the image features with the token embeddings
without disturbing either tower), then everything together.
    all        every parameter (full fine-tuning; also the blind baseline)
    projector  `multi_modal_projector` alone; the vision tower and the language model are frozen
    vision     the vision tower and the projector; the language model is frozen
Frozen parameters get `requires_grad = False` before the engine builds the optimizer, so they have no gradient
and no optimizer state (weight decay cannot move them either). No pretrained SigLIP is available offline, so
this project's warm-up trains the vision tower with the projector (`vision`): a random frozen tower's features
are a poor basis for a projector alone (docs/vlm-training.md has the measured stages).

The blind baseline (`objective.blind = true`): the same model and rows, but every image is replaced by a constant
(mid-grey: pixel value 0 after normalisation), so the answer can depend on the question alone. Whatever the blind
run scores is what the questions give away (their priors); a VLM counts as reading the image by its margin over it.

Held-out metrics: the validation loss (nats per answer token, with bits per byte, LMObjective's) over the first
`objective.val_questions` samples of the val split, and their greedy exact match (`workbench.data.vqa`: a full
forward per new token, so it runs through any engine, sharded ones in lockstep; up to `objective.answer_tokens`, an
eos or an `<image>`), overall (`val_exact_match`, caption rows included) and per question type (`val_em_<type>`).
The eval task (evals/tasks/vqa.py) scores the test split apart. Units: `tokens` (real ids) and `images`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.data.packed import IGNORE_INDEX
from workbench.data.vqa import answer_stops, encode_prompt, greedy_answers, mask_of, normalize
from workbench.train.objectives.base import LossOutput
from workbench.train.objectives.lm import LMObjective

TRAIN_PARTS = {
    # which top-level modules keep requires_grad (module paths of the paligemma2 family)
    "all": None,
    "projector": ("multi_modal_projector",),
    "vision": ("vision_tower", "multi_modal_projector"),
}


def freeze_parts(model: torch.nn.Module, train_parts: str) -> dict[str, int]:
    """Set requires_grad for `train_parts` (see the module notes); returns trainable and frozen parameter counts."""
    keep = TRAIN_PARTS[train_parts]
    for name, p in model.named_parameters():
        p.requires_grad_(keep is None or name.split(".")[0] in keep)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in model.parameters()) - trainable}


class VLMObjective(LMObjective):
    name = "vlm"
    data = "vision"

    def setup(self, job, tokenizer) -> None:
        super().setup(job, tokenizer)
        self.cfg = job.objective
        self.model_cfg = job.model.config
        self.train_parts = job.objective.train_parts
        self.blind = job.objective.blind
        self.max_new_tokens = job.objective.answer_tokens

    def build_data(self, job, tokenizer, log=print):
        """(train set, validation set) of the vision folder `data.dir`: every sample of the train split, and the
        first `objective.val_questions` of the val split (fixed, in order)."""
        from workbench.data.vqa import VQASet

        cfg = job.model.config
        common = {"num_image_tokens": cfg.num_image_tokens, "image_token_id": cfg.image_token_id,
                  "image_size": cfg.vision.image_size, "seq_len": job.data.seq_len, "log": log}
        train = VQASet(job.data.dir, "train", tokenizer, seed=job.run.seed, **common)
        self.val_set = VQASet(job.data.dir, "val", tokenizer, shuffle=False, limit=job.objective.val_questions,
                              **common)
        return train, self.val_set

    def freeze(self, model: torch.nn.Module) -> str:
        """Before the engine is built: freeze what `objective.train_parts` leaves out; a line for the log."""
        counts = freeze_parts(model, self.train_parts)
        return (f"train_parts = {self.train_parts!r}: {counts['trainable']:,} parameters train, "
                f"{counts['frozen']:,} frozen" + ("; blind: every image replaced by a constant" if self.blind else ""))

    def pixels(self, batch: dict) -> torch.Tensor:
        """The batch's images, or under `objective.blind` a constant image (0 after normalisation: mid-grey)."""
        return torch.zeros_like(batch["pixel_values"]) if self.blind else batch["pixel_values"]

    def forward(self, models, micro_batch: dict):
        policy = models["policy"]
        out = policy.forward({"input_ids": micro_batch["input_ids"], "pixel_values": self.pixels(micro_batch),
                              "mask": mask_of(micro_batch)})
        return out, policy.logits(out.hidden).float()  # (B, T, V)

    def units(self, micro_batch: dict) -> int:
        return int((micro_batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, models, micro_batch: dict, total_units: int) -> LossOutput:
        _, logits = self.forward(models, micro_batch)  # (B, T, V)
        labels = micro_batch["labels"]
        # sum of -log p(answer token) over the suffix targets of the micro-batch
        nll_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        loss = nll_sum / max(total_units, 1)
        metrics = {"nll_sum": float(nll_sum.detach()), "targets": self.units(micro_batch), "lm_loss": loss.detach()}
        units = {"tokens": int(micro_batch["lengths"].sum()), "images": int(micro_batch["input_ids"].shape[0])}
        return LossOutput(loss=loss, metrics=metrics, units=units)

    def answers(self, models, batch: dict) -> list[str]:
        """Greedy answers to the prompts of a validation batch (its rows cut at prefix_len)."""
        prompts = {"input_ids": batch["input_ids"].masked_fill(
            torch.arange(batch["input_ids"].shape[1], device=batch["input_ids"].device)[None]
            >= batch["prefix_len"][:, None], self.tokenizer.pad_id),
            "lengths": batch["prefix_len"], "prefix_len": batch["prefix_len"], "pixel_values": batch["pixel_values"]}

        def logits_fn(b):
            return self.forward(models, b)[1]

        stops = answer_stops(self.tokenizer, self.model_cfg.image_token_id)
        ids = greedy_answers(logits_fn, prompts, self.max_new_tokens, stops, self.tokenizer.pad_id)
        return [self.tokenizer.decode(i) for i in ids]

    @torch.no_grad()
    def validation_sums(self, models, batch: dict) -> dict[str, float]:
        sums = super().validation_sums(models, batch)  # nll, targets, text_nll, text_bytes
        truths = self._truths(batch)
        for (kind, truth), answer in zip(truths, self.answers(models, batch)):
            hit = float(normalize(answer) == normalize(truth))
            for key in ("all", kind):
                sums[f"em_{key}"] = sums.get(f"em_{key}", 0.0) + hit
                sums[f"n_{key}"] = sums.get(f"n_{key}", 0.0) + 1
        return sums

    def _truths(self, batch: dict) -> list[tuple[str, str]]:
        # (question type, truth) of the validation set's samples, by their position in it
        return [(self.val_set.samples[i].type, self.val_set.samples[i].answer) for i in batch["index"].tolist()]

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        out = super().validation_metrics(sums)
        out["val_exact_match"] = sums.get("em_all", 0.0) / max(sums.get("n_all", 0.0), 1)
        for key in sorted(k[3:] for k in sums if k.startswith("em_") and k != "em_all"):
            out[f"val_em_{key}"] = sums[f"em_{key}"] / max(sums[f"n_{key}"], 1)
        return out

    def sample_prompt(self, text: str) -> tuple[list[int], list[int] | None]:
        """`text` as a question: <image> x N, bos, the question, "\\n" (answered about an image by `closing_sample`)."""
        return encode_prompt(self.tokenizer, text, self.model_cfg.num_image_tokens, self.model_cfg.image_token_id), None

    @torch.no_grad()
    def closing_sample(self, models, question: str, max_new_tokens: int) -> str:
        """The answer to `question` about the first held-out image (the trainer's closing sample)."""
        from workbench.data.vqa import VQASample, prompt_batch

        val_set = self.val_set
        prompt = torch.tensor(self.sample_prompt(question)[0]).numpy()
        sample = VQASample(0, 0, "sample", question, "", prompt, prompt[:0])
        batch = prompt_batch([sample], val_set.images, self.tokenizer.pad_id)
        device = next(models["policy"].unwrap().parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        ids = greedy_answers(lambda b: self.forward(models, b)[1], batch, max_new_tokens,
                             answer_stops(self.tokenizer, self.model_cfg.image_token_id), self.tokenizer.pad_id)[0]
        return f" -> {self.tokenizer.decode(ids)!r} (about image {val_set.examples[0].id!r} of the val split)"
