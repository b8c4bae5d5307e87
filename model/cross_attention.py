"""Gated cross-attention from text tokens to the resampled visual tokens.

Each text position attends to the visual tokens of the latest ``<image>`` at or before it (its
"text time" counts the ``<image>`` tokens seen so far); positions before the first image attend to
nothing. Both residual branches are scaled by ``tanh(gate)`` with gates starting at exactly 0, so
a fresh block leaves the LM unchanged. Names and arithmetic follow OpenFlamingo v2.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CrossAttentionConfig
from .perceiver import attention_weights, feed_forward, merge_heads, split_heads


class MaskedCrossAttention(nn.Module):
    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8,
                 only_attend_immediate_media: bool = True) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor | None = None,
                use_cached_media: bool = False) -> torch.Tensor:
        """x: text ``(B, T_txt, D)``; media ``(B, T_img, n, D_vis)``; media_locations: bool
        ``(B, T_txt)``, True at ``<image>``. ``use_cached_media``: every position of ``x`` comes
        after all the images in ``media_locations`` (incremental decoding), whatever its length."""
        T_txt = x.shape[1]
        T_img, n = media.shape[1:3]
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        if media_locations is None:
            return self.to_out(merge_heads(attention_weights(q, k, self.scale) @ v))
        if not use_cached_media and media_locations.shape[1] != T_txt:
            raise ValueError(f"media_locations has {media_locations.shape[1]} positions but the text has {T_txt}")
        text_time = self._text_time(media_locations, T_txt, use_cached_media)
        # visual token j belongs to image j // n, numbered from 1 like text_time
        media_time = (torch.arange(T_img, device=x.device) + 1).repeat_interleave(n)
        compare = torch.eq if self.only_attend_immediate_media else torch.ge
        allowed = compare(text_time[:, None, :, None], media_time[None, None, None, :])
        attn = attention_weights(q, k, self.scale, allowed)
        if self.only_attend_immediate_media:
            # a row with nothing allowed would otherwise spread evenly over every image
            attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        return self.to_out(merge_heads(attn @ v))

    @staticmethod
    def _text_time(media_locations: torch.Tensor, length: int, use_cached_media: bool) -> torch.Tensor:
        if use_cached_media:
            return torch.count_nonzero(media_locations, dim=1)[:, None].expand(-1, length)
        return media_locations.cumsum(dim=-1)


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention and a feed-forward, each added back through a tanh gate that starts at 0."""

    def __init__(self, *, dim: int, dim_visual: int, config: CrossAttentionConfig | None = None) -> None:
        super().__init__()
        cfg = config or CrossAttentionConfig()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=cfg.dim_head,
                                         heads=cfg.heads,
                                         only_attend_immediate_media=cfg.only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = feed_forward(dim, cfg.ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor | None = None,
                use_cached_media: bool = False) -> torch.Tensor:
        x = self.attn(x, media, media_locations, use_cached_media) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x
