"""Projectors map vision features (B, N, Dv) to language-model embeddings (B, M, Dt).

Each projector is one small class in PROJECTORS; `num_tokens(n)` says how many image tokens
it emits for `n` input features, which fixes how many placeholders a prompt gets.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.models.specs import PROJECTOR_NAMES


class LinearProjector(nn.Module):
    """One linear map per token (the DINOv2 + Gemma 2 seed, PaliGemma style)."""

    def __init__(self, vision_dim: int, text_dim: int, dropout: float = 0.0, **_: object) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(vision_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(features))

    def num_tokens(self, num_features: int) -> int:
        return num_features


class MLPProjector(nn.Module):
    """Two layers with GELU (LLaVA-1.5's mlp2x_gelu)."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        **_: object,
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or text_dim
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(vision_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, text_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def num_tokens(self, num_features: int) -> int:
        return num_features


class ResamplerProjector(nn.Module):
    """Learnable queries cross-attending to the vision features (Qwen-VL / the miniVLM adapter).

    Emits `num_queries` tokens whatever the tower's token count, so a 196-patch ViT and a
    1024-patch one cost the language model the same.
    """

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        num_queries: int = 196,
        num_heads: int | None = None,
        dropout: float = 0.0,
        **_: object,
    ) -> None:
        super().__init__()
        heads = num_heads or next(
            h for h in (text_dim // 128, text_dim // 64, 8, 4, 2, 1) if h and text_dim % h == 0
        )
        self.queries = nn.Parameter(torch.randn(num_queries, text_dim) * 0.02)
        self.kv_proj = nn.Linear(vision_dim, text_dim)
        self.norm_q = nn.LayerNorm(text_dim)
        self.norm_kv = nn.LayerNorm(text_dim)
        self.attention = nn.MultiheadAttention(text_dim, heads, dropout=dropout, batch_first=True)
        self.norm_out = nn.LayerNorm(text_dim)
        self.out_proj = nn.Linear(text_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        keys = self.norm_kv(self.kv_proj(features))
        queries = self.norm_q(self.queries).unsqueeze(0).expand(features.shape[0], -1, -1)
        attended, _ = self.attention(queries, keys, keys, need_weights=False)
        return self.out_proj(self.norm_out(attended + queries))

    def num_tokens(self, num_features: int) -> int:
        return self.queries.shape[0]


PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "resampler": ResamplerProjector,
}
assert tuple(PROJECTORS) == PROJECTOR_NAMES, "list a new projector in vlmkit.models.specs.PROJECTOR_NAMES"
