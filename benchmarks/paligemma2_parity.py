"""PaliGemma 2 against transformers on the same weights: logit differences per dtype and mask, and CPU speed.

    python benchmarks/paligemma2_parity.py                 # the figures of docs/paligemma2.md
    python benchmarks/paligemma2_parity.py --smoke         # tiny shapes, seconds
    python benchmarks/paligemma2_parity.py --masks docs/images/paligemma2/masks.png   # the mask picture only
                                                           # (with --smoke: the picture, then the smoke run)

Parity: a random PaliGemmaForConditionalGeneration (Gemma 2 text config, every layer kind and both soft-caps
active, random norm weights) of the `paligemma2` flavor --flavor, its weights imported through the HF
adapter; max |logits_ours - logits_hf| over a batch of two left-padded rows, for the training mask (labels +
token_type_ids), the inference prefill (the whole prompt as prefix) and the plain causal one, in float64,
float32 and bfloat16 (eager attention in transformers; ours on each backend).

Speed: one prefill forward (B x T tokens with the image) and greedy generation of --new tokens, ours against
transformers (eager, the soft-caps force it), interleaved, median of --reps, on --threads CPU threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench.checkpoint.hf.paligemma2 import config_from_hf, config_to_hf, state_dict_from_hf
from workbench.inference.vlm import generate
from workbench.models.base import ModelSection
from workbench.models.paligemma2 import PaliGemma2
from workbench.nn.attention import MaskSpec


def hf_model(flavor: str, seed: int = 0, **over):
    import transformers

    cfg = ModelSection.of("paligemma2", flavor, **over).config
    hf_cfg = config_to_hf(cfg, bos_id=0, eos_id=1, pad_id=2)
    hf_cfg["text_config"]["initializer_range"] = 0.2
    hf_cfg["vision_config"]["initializer_range"] = 0.2
    torch.manual_seed(seed)
    conf = transformers.PaliGemmaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"},
                                        attn_implementation="eager")
    model = transformers.PaliGemmaForConditionalGeneration(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(0.0 if "language_model" in name else 1.0, 0.3)
        model.model.language_model.embed_tokens.weight.normal_(0.0, 0.05)
    return model


def ours_from(hf, backend: str) -> PaliGemma2:
    """Ours with transformers' weights, in their dtype (parameters only: RoPE stays float32, as in build_model)."""
    cfg = config_from_hf(hf.config.to_dict())
    cfg.attn_backend = cfg.vision.attn_backend = backend
    model = PaliGemma2(cfg).eval()
    dtype = next(hf.parameters()).dtype
    for p in model.parameters():
        p.data = p.data.to(dtype)
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    return model


def batch(cfg, lens=(40, 31), prefix=(30, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    N, T = cfg.num_image_tokens, max(lens) + cfg.num_image_tokens
    ids = torch.full((2, T), 2, dtype=torch.long)
    att = torch.zeros(2, T, dtype=torch.long)
    tt = torch.ones(2, T, dtype=torch.long)
    for b, n in enumerate(lens):
        row = torch.randint(12, cfg.vocab_size, (n + N,), generator=g)
        row[row == cfg.image_token_id] = 12  # no stray <image> in the text
        row[:N], row[N] = cfg.image_token_id, 0
        ids[b, T - n - N:], att[b, T - n - N:] = row, 1
        tt[b, : T - n - N + N + prefix[b]] = 0
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    S = cfg.vision.image_size
    return ids, att, tt, pos, torch.randn(2, 3, S, S, generator=g)


def parity(flavor: str, backends: list[str]) -> None:
    print(f"max |logits ours - transformers| on real tokens ({flavor} flavor, 2 rows, left-padded but in float64):")
    print(f"{'dtype':9} {'backend':7} {'training':>10} {'prefill':>10} {'causal':>10}   max |logit|")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        hf = hf_model(flavor)
        inv_freq = {n: b.clone() for n, b in hf.named_buffers() if n.endswith("inv_freq")}
        hf = hf.to(dtype)
        # `.to(dtype)` also rounds transformers' RoPE frequencies (a buffer); loaded with from_pretrained(dtype=...)
        # they stay float32, as ours always do (build_model casts parameters only): put them back
        for n, b in inv_freq.items():
            hf.get_submodule(n.rpartition(".")[0]).inv_freq = b
        # float64: no padding. transformers' eager float64 path turns a left-padded row into NaN under the causal
        # mask (a pad query sees no key, its NaN output reaches the real tokens through zero attention weights)
        lens = (40, 40) if dtype == torch.float64 else (40, 31)
        ids, att, tt, pos, pix = batch(ours_from(hf, "math").cfg, lens=lens)
        pix = pix.to(dtype)
        real = att.bool()
        T = ids.shape[1]
        cases = {"training": (dict(token_type_ids=tt, labels=torch.where(tt == 1, ids, -100)),
                              MaskSpec(prefix_len=(tt == 0).sum(-1), key_padding=real)),  # pads + prefix
                 "prefill": (dict(token_type_ids=torch.zeros_like(tt)), MaskSpec(prefix_len=torch.full((2,), T),
                                                                                 key_padding=real)),
                 "causal": ({}, MaskSpec(key_padding=real))}
        with torch.no_grad():
            refs = {k: hf(input_ids=ids, pixel_values=pix, attention_mask=att, position_ids=pos + 1, **kw).logits
                    for k, (kw, _) in cases.items()}
        for backend in backends:
            ours = ours_from(hf, backend)
            diffs = []
            with torch.no_grad():
                for k, (_, mask) in cases.items():
                    out = ours({"input_ids": ids, "pixel_values": pix, "positions": pos + 1, "mask": mask})
                    diffs.append((ours.logits(out.hidden)[real] - refs[k][real]).abs().max().item())
            top = refs["training"][real].abs().max().item()
            print(f"{str(dtype).removeprefix('torch.'):9} {backend:7} " + " ".join(f"{d:10.2e}" for d in diffs)
                  + f"   {top:.3g}")


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(flavor: str, reps: int, new: int) -> None:
    hf = hf_model(flavor)
    ours = ours_from(hf, "sdpa")
    ids, att, tt, pos, pix = batch(ours.cfg, lens=(64, 64), prefix=(64, 64))
    zeros = torch.zeros_like(tt)
    prompts = ids.tolist()

    def f_hf():
        hf(input_ids=ids, pixel_values=pix, token_type_ids=zeros)

    def f_ours():
        ours({"input_ids": ids, "pixel_values": pix, "mask": MaskSpec(prefix_len=torch.full((2,), ids.shape[1]))})

    def g_hf():
        return hf.generate(input_ids=ids, pixel_values=pix, token_type_ids=zeros, max_new_tokens=new,
                           do_sample=False, eos_token_id=None, pad_token_id=2)[:, ids.shape[1]:].tolist()

    def g_ours():
        return generate(ours, prompts, pix, max_new_tokens=new)

    assert g_hf() == g_ours(), "greedy tokens differ"
    with torch.inference_mode():
        rows = {}
        for name, a, b in (("prefill forward", f_ours, f_hf), (f"greedy generate ({new} tokens)", g_ours, g_hf)):
            a(), b()  # warm-up
            ta, tb = [], []
            for _ in range(reps):  # interleaved
                ta.append(median_time(a, 1))
                tb.append(median_time(b, 1))
            rows[name] = statistics.median(ta), statistics.median(tb)
    T = ids.shape[1]
    print(f"\nCPU speed ({flavor} flavor, batch 2 x {T} prompt tokens incl. {ours.cfg.num_image_tokens} image tokens, "
          f"{torch.get_num_threads()} threads, median of {reps}):")
    print(f"{'':32} {'ours':>9} {'transformers':>13} {'ratio':>7}")
    for name, (a, b) in rows.items():
        print(f"{name:32} {a * 1e3:7.1f}ms {b * 1e3:11.1f}ms {b / a:6.2f}x")


def mask_picture(path: str) -> None:
    """The masks the debug model's layers use (its own `layer_masks`, densified by MaskSpec.dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = PaliGemma2(ModelSection.of("paligemma2", "debug").config)
    N, T, P = model.cfg.num_image_tokens, 12, 8  # 4 image + bos + 2 prefix + "\n" = 8 prefix slots, 4 suffix
    kp = torch.ones(1, T + 2, dtype=torch.bool)
    kp[0, :2] = False  # two left-pad slots
    train = model.language_model.layer_masks(MaskSpec(prefix_len=torch.tensor([P + 2]), key_padding=kp))
    causal = model.language_model.layer_masks(MaskSpec(key_padding=kp))
    panels = [("prefix-LM, full layer", train[1]), (f"prefix-LM, sliding layer (W = {model.cfg.sliding_window})",
                                                    train[0]), ("plain causal (no prefix_len), full layer", causal[1])]
    labels = ["pad", "pad"] + ["img"] * N + ["bos", "q1", "q2", "\\n", "a1", "a2", "a3", "eos"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (title, spec) in zip(axes, panels):
        ax.imshow(spec.dense(T + 2, T + 2)[0, 0].int(), cmap="Blues", vmin=0, vmax=1.4)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(T + 2), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T + 2), labels, fontsize=7)
        ax.set_xlabel("key slot", fontsize=8)
        ax.set_ylabel("query slot", fontsize=8)
    fig.suptitle("PaliGemma 2 attention masks, blue = allowed (pad slots: hidden as keys, their outputs unused)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="small", help="paligemma2 flavor for both parts (default small)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=16, help="tokens to generate in the speed test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="debug flavor, no flex rows, 2 reps, 4 tokens")
    ap.add_argument("--masks", metavar="PNG", help="draw the attention masks into PNG (and stop, unless --smoke)")
    args = ap.parse_args()
    if args.masks:
        mask_picture(args.masks)
        if not args.smoke:
            return
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.flavor, args.reps, args.new = "debug", 2, 4
    parity(args.flavor, ["sdpa", "math"] if args.smoke else ["sdpa", "math", "flex"])  # eager flex is slow on CPU
    speed(args.flavor, args.reps, args.new)


if __name__ == "__main__":
    main()
