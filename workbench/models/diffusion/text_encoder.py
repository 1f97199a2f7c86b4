"""CLIP's text transformer: the prompt encoder of Stable Diffusion 1.x.

What it is
    The text tower of CLIP (Radford et al. 2021; transformers' `CLIPTextModel`): token and learned
    position embeddings, a pre-norm transformer with *causal* self-attention, and a final LayerNorm. SD
    cross-attends to the whole `last_hidden_state` (B, 77, 768) taken after `final_layer_norm`; CLIP's
    own contrastive head uses only the pooled state at the end-of-text token.

The math (x of shape (B, T, dim))
    x = E_tok[ids] + E_pos[0 .. T-1]
    per layer:  h = x + W_o Attn_causal(LN1(x));   x = h + fc2(quick_gelu(fc1(LN2(h))))
    quick_gelu(u) = u * sigmoid(1.702 u)
    last_hidden_state = LN_final(x);  pooled = last_hidden_state[b, first index of eos in ids_b]
                                      (or the argmax of ids_b when the config says eos_token_id = 2,
                                      the old configs SD 1.x ships, whose eos has the largest id)

The intuition
    CLIP's text tower was trained causally with the summary at the end-of-text token, so early tokens
    never see later ones: SD's prompt states for "a red cube" describe "red" before knowing it is a cube,
    and the padding (EOS repeated) after the prompt carries a summary of all of it.

Design choices
    Module names are transformers' without the `text_model.` prefix (the adapter strips it), attention
    goes through `workbench.nn.attention.AttentionCore` with a causal spec (plus `key_padding` when an
    attention mask is given; SD 1.x passes none). `__init__` is meta-safe; `init_weights` is CLIP's:
    N(0, 0.02) embeddings and projections, N(0, 0.01) positions.

Differences from the reference
    None in the forward math (parity with `CLIPTextModel` at atol 1e-5 fp32, tests/parity/
    test_diffusion_hf.py). With an attention mask, padded *query* rows differ (the mask spec lets a pad
    query see itself; transformers lets it see nothing of itself); real tokens agree, and SD never
    passes a mask.

Sources
    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2103.00020);
    transformers modeling_clip.py (read, not copied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_
from workbench.nn.attention import AttentionCore, MaskSpec


@dataclass
class Config:
    vocab_size: int = field_(49408, gt=0)
    dim: int = field_(768, gt=0, doc="hidden_size")
    n_layers: int = field_(12, gt=0)
    n_heads: int = field_(12, gt=0)
    ffn_dim: int = field_(3072, gt=0, doc="intermediate_size")
    max_positions: int = field_(77, gt=0, doc="max_position_embeddings (the tokenizer pads to this)")
    norm_eps: float = field_(1e-5, gt=0)
    activation: str = field_("quick_gelu", doc="quick_gelu (CLIP) or gelu (OpenCLIP-H in SD 2.x)")
    eos_token_id: int = field_(49407, doc="the pooled state's token; 2 = the old configs' argmax rule")

    def validate(self) -> None:
        if self.dim % self.n_heads:
            fail("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")
        if self.activation not in ("quick_gelu", "gelu"):
            fail("activation", f"expected quick_gelu or gelu, got {self.activation!r}")


FLAVORS: dict[str, Config] = {
    # tests: transformers' tiny test config (models.md section 6)
    "debug": Config(vocab_size=1000, dim=32, n_layers=5, n_heads=4, ffn_dim=37),
    # ViT-L/14's text tower (Stable Diffusion 1.x), about 123M parameters
    "sd15": Config(eos_token_id=2),
    # OpenCLIP ViT-H/14's text tower as SD 2.x stores it: 23 of its 24 layers (SD 2 reads the penultimate one)
    "sd2": Config(dim=1024, n_layers=23, n_heads=16, ffn_dim=4096, activation="gelu", eos_token_id=2),
}


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)
        self.core = AttentionCore(scale=self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)
        out = self.core(q, k, v, mask).transpose(1, 2).reshape(B, T, H * D)  # (B, T, dim)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.quick = cfg.activation == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        # quick_gelu(u) = u * sigmoid(1.702 u)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.dim)


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's: token embeddings and every Linear N(0, 0.02) with zero biases, positions N(0, 0.01),
        LayerNorms ones/zeros. Safe after `to_empty()`."""
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> dict:
        """input_ids (B, T), T <= max_positions -> {"last_hidden_state" (B, T, dim) after the final norm,
        "pooled" (B, dim), and "hidden_states" (embeddings + each layer, before the final norm) if asked}."""
        B, T = input_ids.shape
        if T > self.cfg.max_positions:
            raise ValueError(f"input_ids: {T} tokens, the text encoder has {self.cfg.max_positions} positions")
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:T]  # (B, T, dim)
        mask = MaskSpec(causal=True, key_padding=attention_mask.bool() if attention_mask is not None else None)
        states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, mask)
            if states is not None:
                states.append(x)
        last = self.final_layer_norm(x)
        if self.cfg.eos_token_id == 2:  # old configs: the eos token has the largest id
            idx = input_ids.to(torch.int).argmax(dim=-1)
        else:
            idx = (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(B, device=last.device), idx]  # (B, dim)
        out = {"last_hidden_state": last, "pooled": pooled}
        if states is not None:
            out["hidden_states"] = tuple(states)
        return out


Model = CLIPTextModel
