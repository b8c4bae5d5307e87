"""The Perceiver resampler: a fixed number of learned latents read every image's patch tokens.

Module and parameter names (``layers.N.0`` attention, ``layers.N.1`` feed-forward, ``ff.1``/``ff.3``
linears) are OpenFlamingo v2's, so its checkpoints load by name. The arithmetic follows it step by
step (scale q before the product, subtract the row max, softmax) so logits agree to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ResamplerConfig


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear; a Sequential so the parameters are named 0, 1 and 3."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(b, ..., n, h*d)`` -> ``(b, h, ..., n, d)``."""
    return x.unflatten(-1, (heads, -1)).movedim(-2, 1)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(b, h, ..., n, d)`` -> ``(b, ..., n, h*d)``."""
    return x.movedim(1, -2).flatten(-2)


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float,
                      allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention weights; ``allowed`` (broadcastable bool) masks scores where it is False."""
    sim = (q * scale) @ k.transpose(-1, -2)
    if allowed is not None:
        sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    return sim.softmax(dim=-1)


class PerceiverAttention(nn.Module):
    """Latents attend to the image tokens and to themselves (keys/values from both)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: image tokens ``(b, T, n1, D)``; latents ``(b, T, n2, D)`` -> ``(b, T, n2, D)``."""
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        out = attention_weights(q, k, self.scale) @ v
        return self.to_out(merge_heads(out))


class PerceiverResampler(nn.Module):
    """``(b, T_img, F, v, D)`` patch tokens -> ``(b, T_img, num_latents, D)`` visual tokens."""

    def __init__(self, *, dim: int, config: ResamplerConfig | None = None) -> None:
        super().__init__()
        cfg = config or ResamplerConfig()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(cfg.max_num_frames, dim)) if cfg.max_num_frames else None
        self.media_time_embs = (nn.Parameter(torch.randn(cfg.max_num_media, 1, dim))
                                if cfg.max_num_media else None)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=cfg.dim_head, heads=cfg.heads),
                           feed_forward(dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, T, F, v = x.shape[:4]
        if self.frame_embs is not None:
            x = x + self.frame_embs[:F].view(1, 1, F, 1, -1)
        x = x.flatten(2, 3)  # frames and patches form one token axis per image
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:T]
        latents = self.latents.expand(b, T, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
