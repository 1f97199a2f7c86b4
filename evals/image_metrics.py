"""Image-generation metrics with judges the project trains itself: FID, class-conditional accuracy, CLIP-style score.

What it is
    The published metrics use networks trained elsewhere (Inception-v3 for FID, OpenAI's CLIP for the
    CLIP-score) that this workbench cannot download, and that would not know 16-pixel shapes anyway. So the
    project trains its own judges on the *same* captioned images the generator learnt from (train split only),
    and the report says so:
      classifier   a ResNet of workbench/models/fundamentals/cnn.py; its penultimate features (the input of
                   its last linear layer) are FID's feature space, its prediction the class accuracy's judge;
      text-image   the contrastive model of workbench/models/contrastive.py (CLIP loss by default), whose
                   cosine between an image and its prompt is the CLIP-style score.
    `EvalNets.load_or_train(cache, ...)` trains both once per data setting and seed and caches them in a folder
    keyed by those settings (`nets_key`), so evals do not retrain them.

The math
    FID (Heusel et al. 2017). Fit a Gaussian to each set's features, N(mu_r, S_r) and N(mu_g, S_g):
        FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})
        computed as Tr((S_r S_g)^{1/2}) = sum_i sqrt(lambda_i(S_r^{1/2} S_g S_r^{1/2})): that matrix is
        symmetric positive semi-definite, so its eigenvalues are real and >= 0 (clamped at 0 for round-off),
        with no complex square roots to discard as scipy.linalg.sqrtm(S_r S_g) needs.
    Class accuracy. Generate n images per class with that class's prompt; accuracy = mean[argmax f(x) = asked].
    CLIP-score (Hessel et al. 2021). 100 * max(cos(u(x), v(prompt)), 0), averaged over the generated images.

Validation (the references every report shows beside the model's numbers)
    real   held-out test images (never seen by the judges or the generator), as many per class as were
           generated: FID against the training features = the finite-sample floor of FID; accuracy = the
           classifier's test accuracy; CLIP-score = the score of real pairs. A perfect generator scores about this.
    noise  uniform random pixels, as many: FID large, accuracy near chance, CLIP-score near 0. The worst.
    A model's figure counts when it lies between the two and near `real`; tests assert real beats noise on each.

Design choices
    FID is computed against the *training* images' statistics (what the generator imitates) with the same
    number of generated and real-reference images, since FID's bias depends on that number (Chong & Forsyth
    2020): compare FIDs only at equal n. Features are float64 before the covariance.
    The classifier trains with the crop-and-flip augmentation of the cnn task (label preserving for shapes;
    none for digits); the contrastive model with the multi-positive loss (same class = positive).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import field_
from workbench.errors import WorkbenchError

__all__ = ["NetsConfig", "EvalNets", "gaussian_stats", "frechet_distance", "nets_key", "psnr", "ssim"]

VERSION = 1  # bump when the training recipe changes, so old caches are not reused


@dataclass
class NetsConfig:
    classifier: str = field_("tiny", doc="a flavor of workbench.models.fundamentals.cnn (the FID features too)")
    classifier_epochs: int = field_(20, gt=0)
    classifier_lr: float = field_(2e-3, gt=0)
    clip: str = field_("small", doc="a flavor of workbench.models.contrastive")
    clip_loss: str = field_("clip", doc="clip | siglip (workbench/models/contrastive.py says why clip)")
    clip_epochs: int = field_(15, gt=0)
    lr: float = field_(1e-3, gt=0, doc="the text-image model's peak learning rate")
    warmup_steps: int = field_(50, ge=0, doc="linear warm-up, then cosine decay; without it the contrastive "
                                            "model can fall into the collapsed solution in its first steps")
    batch_size: int = field_(64, gt=0)

    def validate(self) -> None:
        from workbench.config import fail
        from workbench.models import contrastive
        from workbench.models.fundamentals.cnn import FLAVORS

        if self.classifier not in FLAVORS:
            fail("classifier", f"expected one of {', '.join(FLAVORS)}, got {self.classifier!r}")
        if self.clip not in contrastive.FLAVORS:
            fail("clip", f"expected one of {', '.join(contrastive.FLAVORS)}, got {self.clip!r}")
        if self.clip_loss not in ("siglip", "clip"):
            fail("clip_loss", f"expected 'siglip' or 'clip', got {self.clip_loss!r}")


def nets_key(dataset: str, n: int, size: int, seed: int, val_fraction: float, cfg: NetsConfig) -> str:
    """The cache folder name of the judges trained on one data setting with one recipe."""
    blob = json.dumps({"v": VERSION, "data": [dataset, n, size, seed, val_fraction], "nets": asdict(cfg)}, sort_keys=True)
    return f"{dataset}-n{n}-s{size}-seed{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------------------------------
# FID


def gaussian_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64 of features (N, D), N >= 2 (unbiased covariance)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"gaussian_stats: expected features (N >= 2, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 (s1 s2)^{1/2}) (see the module notes for how the root is taken)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"frechet_distance: shapes differ: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    r = _sqrt_psd(s1)
    # Tr (s1 s2)^{1/2} = sum sqrt(eig(r s2 r)), r = s1^{1/2}: r s2 r is symmetric PSD
    lam = np.linalg.eigvalsh((r @ s2 @ r + (r @ s2 @ r).T) / 2)
    tr_root = np.sqrt(np.clip(lam, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root)


# ----------------------------------------------------------------------------------------------------
# The judges


class _Penultimate:
    """Captures the input of a classifier's last linear layer (its penultimate features) on each forward."""

    def __init__(self, classifier: nn.Module):
        last = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
        self.value: Tensor | None = None
        last.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.value = inputs[0].detach()


@dataclass
class EvalNets:
    classifier: nn.Module  # images in [0, 1] -> logits; eval mode
    clip: nn.Module  # workbench.models.contrastive.ContrastiveModel; eval mode
    vocab: object  # workbench.data.captioned.Vocab
    meta: dict  # settings, judge quality on the test split, training time
    folder: Path | None = None

    def __post_init__(self) -> None:
        self._features = _Penultimate(self.classifier)

    @torch.no_grad()
    def judge(self, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
        """(logits (N, K), penultimate features (N, D), unit image embeddings (N, E)) of images in [0, 1]."""
        device = next(self.classifier.parameters()).device
        logits, feats, emb = [], [], []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).float()
            logits.append(self.classifier(x).float().cpu())
            feats.append(self._features.value.float().cpu())
            emb.append(self.clip.encode_image(x).float().cpu())
        return torch.cat(logits), torch.cat(feats), torch.cat(emb)

    @torch.no_grad()
    def text(self, captions: list[str]) -> Tensor:
        device = next(self.clip.parameters()).device
        return self.clip.encode_text(self.vocab.encode(captions).to(device)).float().cpu()

    def score(self, images: Tensor, asked: Tensor, prompts: list[str], ref: tuple[np.ndarray, np.ndarray]) -> dict:
        """FID against `ref` (mean, cov), class accuracy against the asked classes, CLIP-score against the
        prompt of each asked class (prompts[k] for class k)."""
        from workbench.models.contrastive import clip_score

        logits, feats, emb = self.judge(images)
        text = self.text(prompts)  # (K, E)
        return {"fid": frechet_distance(*gaussian_stats(feats), *ref),
                "class_accuracy": (logits.argmax(1) == asked).double().mean().item(),
                "clip_score": clip_score(emb, text[asked]).mean().item()}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(folder / "classifier.safetensors"))
        save_file({k: v.contiguous() for k, v in self.clip.state_dict().items()}, str(folder / "clip.safetensors"))
        # meta.json last: its presence marks a complete folder
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=1) + "\n")
        self.folder = folder

    @classmethod
    def load_or_train(cls, cache: str | Path, data, dataset: str, n: int, size: int, seed: int, val_fraction: float,
                      cfg: NetsConfig, device: torch.device | str = "cpu",
                      log: Callable[[str], None] = print) -> EvalNets:
        """The judges for `data` (workbench.data.captioned.CaptionedImages loaded with those settings), from
        `cache/<nets_key>/` when they are there, else trained now and saved there."""
        folder = Path(cache) / nets_key(dataset, n, size, seed, val_fraction, cfg)
        if (folder / "meta.json").is_file():
            nets = cls._load(folder, data, cfg, device)
            log(f"eval networks: loaded from {folder}")
            return nets
        log(f"eval networks: training a {cfg.classifier} classifier and a {cfg.clip} text-image model on the "
            f"{dataset} training split (cached in {folder})")
        nets = train_nets(data, cfg, seed, device, log)
        nets.meta |= {"dataset": dataset, "n": n, "size": size, "seed": seed, "val_fraction": val_fraction,
                      "key": folder.name}
        nets.save(folder)
        return nets

    @classmethod
    def _load(cls, folder: Path, data, cfg: NetsConfig, device) -> EvalNets:
        from workbench.checkpoint.safetensors_io import read_file

        meta = json.loads((folder / "meta.json").read_text())
        classifier, clip = _build(data, cfg)
        try:
            classifier.load_state_dict(read_file(folder / "classifier.safetensors"))
            clip.load_state_dict(read_file(folder / "clip.safetensors"))
        except (RuntimeError, OSError) as e:
            raise WorkbenchError(f"eval networks in {folder} do not load ({e}); delete the folder to retrain") from None
        return cls(classifier.to(device).eval(), clip.to(device).eval(), data.vocab, meta, folder)


def _build(data, cfg: NetsConfig) -> tuple[nn.Module, nn.Module]:
    from workbench.models import contrastive
    from workbench.models.fundamentals.cnn import build, make_config
    from workbench.train.fundamentals.vision import Classifier, Standardize

    x = data.images.train[0]
    c, h, _ = x.shape[1:]
    mcfg = make_config(cfg.classifier, in_channels=c, num_classes=len(data.classes), image_size=h)
    classifier = Classifier(Standardize(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp(min=1e-3)), build(mcfg))
    clip = contrastive.ContrastiveModel(contrastive.make_config(
        cfg.clip, in_channels=c, vocab_size=len(data.vocab), max_len=data.vocab.length, loss=cfg.clip_loss))
    clip.init_weights()
    return classifier, clip


def _epochs(n: int, cfg: NetsConfig, epochs: int, g: torch.Generator):
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            yield order[i:i + cfg.batch_size]


def train_nets(data, cfg: NetsConfig, seed: int, device: torch.device | str = "cpu",
               log: Callable[[str], None] = print) -> EvalNets:
    """Train the classifier and the text-image model on `data`'s training split (AdamW, cosine decay);
    measure them on its test split (meta: test_accuracy, real_clip_score, mismatched_clip_score)."""
    from workbench.train.fundamentals.vision import crop_flip
    from workbench.train.optim import lr_multiplier

    torch.manual_seed(seed)
    classifier, clip = _build(data, cfg)
    classifier.to(device).train()
    clip.to(device).train()
    x, y = data.images.train
    ids = data.tokens("train")
    g = torch.Generator().manual_seed(seed)
    meta: dict = {"nets": asdict(cfg), "trained_on": f"the {data.images.name} training split ({len(y)} images)"}
    augment = data.images.name != "digits"  # a mirrored digit is not that digit

    for name, model, epochs in (("classifier", classifier, cfg.classifier_epochs), ("clip", clip, cfg.clip_epochs)):
        t0 = time.perf_counter()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr if name == "clip" else cfg.classifier_lr,
                                weight_decay=0.0 if name == "clip" else 1e-4)
        steps = epochs * -(-len(y) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, steps=steps: lr_multiplier(s, steps, cfg.warmup_steps, "cosine", 0.0))
        for idx in _epochs(len(y), cfg, epochs, g):
            xb, yb = x[idx].to(device), y[idx].to(device)
            if augment:
                xb = crop_flip(xb, max(1, xb.shape[-1] // 8))
            if name == "classifier":
                loss = F.cross_entropy(model(xb), yb)
            else:
                loss = model.loss(xb, ids[idx].to(device), same=yb[:, None] == yb[None, :])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        meta[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        model.eval()
    nets = EvalNets(classifier, clip, data.vocab, meta)
    xt, yt = data.images.test
    logits, _, emb = nets.judge(xt)
    from workbench.models.contrastive import clip_score

    text = nets.text(data.prompts())
    wrong = (yt + torch.randint(1, len(data.classes), yt.shape, generator=g)) % len(data.classes)
    meta |= {"test_accuracy": (logits.argmax(1) == yt).double().mean().item(),
             "real_clip_score": clip_score(emb, text[yt]).mean().item(),
             "mismatched_clip_score": clip_score(emb, text[wrong]).mean().item(),
             "test_images": len(yt)}
    log(f"eval networks: classifier test accuracy {meta['test_accuracy']:.4f}; CLIP-score of real test pairs "
        f"{meta['real_clip_score']:.1f}, of mismatched pairs {meta['mismatched_clip_score']:.1f}")
    return nets


def references(nets: EvalNets, data, per_class: int, seed: int) -> dict[str, dict]:
    """The scores of real held-out images and of noise, `per_class` images of each class (see the module notes),
    and the training features' statistics every FID here is measured against (key "ref")."""
    _, train_feats, _ = nets.judge(data.images.train[0])
    ref = gaussian_stats(train_feats)
    xt, yt = data.images.test
    g = torch.Generator().manual_seed(seed)
    pick = []
    for k in range(len(data.classes)):
        members = torch.nonzero(yt == k).flatten()
        if len(members) < per_class:
            raise WorkbenchError(f"the {data.images.name} test split holds {len(members)} images of class "
                                 f"{data.classes[k]!r}, fewer than the {per_class} per class asked for: lower it "
                                 f"or render more images (n)")
        pick.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    idx = torch.cat(pick)
    asked = torch.arange(len(data.classes)).repeat_interleave(per_class)
    noise = torch.rand((len(idx), *xt.shape[1:]), generator=g)
    prompts = data.prompts()
    return {"real": nets.score(xt[idx], yt[idx], prompts, ref), "noise": nets.score(noise, asked, prompts, ref),
            "ref": ref}


# ----------------------------------------------------------------------------------------------------
# Reconstruction metrics (NeRF's held-out views; video frames): PSNR and SSIM against a reference image


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"{what}: expected two images batches of one shape (N, C, H, W), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def psnr(a: Tensor, b: Tensor, max_val: float = 1.0) -> Tensor:
    """Per-image PSNR (N,) in dB of float images (N, C, H, W): 10 log10(max_val^2 / MSE), MSE over C, H, W
    (inf for identical images). The form of skimage.metrics.peak_signal_noise_ratio with data_range = max_val."""
    _check_pair(a, b, "psnr")
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(max_val ** 2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, max_val: float = 1.0, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> Tensor:
    """Per-image SSIM (N,) of float images (N, C, H, W) (Wang et al. 2004), averaged over channels and over the
    positions where the whole window fits (a "valid" filter):
        SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
        C1 = (k1 L)^2, C2 = (k2 L)^2, L = max_val,
    with local means, variances and covariance under a window x window Gaussian of std `sigma` (population
    statistics). The same number as skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L, channel_axis=...) (tested), whose window is 11 wide at sigma
    1.5 and whose mean skips the border of half a window."""
    _check_pair(a, b, "ssim")
    n, c, h, w = a.shape
    if min(h, w) < window:
        raise ValueError(f"ssim: images of {h}x{w} are smaller than the {window}x{window} window")
    x, y = a.double(), b.double()
    g = _gaussian_window(window, sigma, torch.float64)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)  # one 2D Gaussian per channel

    def blur(t: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, H - window + 1, W - window + 1)
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    # s_x^2 = E[x^2] - mu_x^2, s_xy = E[xy] - mu_x mu_y
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)
