"""Cross-attention attached to a Hugging Face causal LM, keeping the LM's own parameter names.

OpenFlamingo wraps every decoder block in a new module and keeps the old blocks and the new
cross-attention blocks reachable under second names (``old_decoder_blocks``,
``gated_cross_attn_layers``), so its state dict holds each tensor twice and the LM's weights move to
``...N.decoder_layer.*``. Here the block is attached as a child of the decoder layer it precedes
(``<decoder path>.N.gated_cross_attn_layer``, the name the published checkpoints use) and runs from
a forward pre-hook; the decoder layer itself is untouched, so the LM keeps its names, its call
convention (positional or keyword hidden states) and its own gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ckpt_tools.errors import UsageError

from .config import LM_FAMILIES, CrossAttentionConfig, LMFamily
from .cross_attention import GatedCrossAttentionBlock


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def lm_family(lm: nn.Module) -> LMFamily | None:
    return LM_FAMILIES.get(getattr(getattr(lm, "config", None), "model_type", None))


def resolve_decoder_layers_attr_name(lm: nn.Module, override: str | None = None) -> str:
    """The dotted path of the LM's decoder-block list: the override, else the family table, else the
    longest ``nn.ModuleList`` whose children all share one class."""
    if override:
        if not isinstance(_try_submodule(lm, override), nn.ModuleList):
            raise UsageError(f"decoder_layers_attr_name {override!r} is not an nn.ModuleList in "
                             f"{type(lm).__name__}", fix=f"use one of: {', '.join(_block_lists(lm)) or 'none'}")
        return override
    family = lm_family(lm)
    if family and isinstance(_try_submodule(lm, family.decoder_layers), nn.ModuleList):
        return family.decoder_layers
    lists = _block_lists(lm)
    if not lists:
        raise UsageError(f"cannot find the decoder layers of {type(lm).__name__}",
                         fix="pass decoder_layers_attr_name='path.to.layers'")
    return max(lists, key=lambda path: len(lists[path]))  # first longest wins: the outermost stack


def _try_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_submodule(root, path)
    except AttributeError:
        return None


def _block_lists(lm: nn.Module) -> dict[str, nn.ModuleList]:
    """Every non-empty ModuleList of same-class children, by path, in definition order."""
    found = {}
    for path, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            found[path] = module
    return found


class CrossAttentionLayer(GatedCrossAttentionBlock):
    """A gated cross-attention block that runs just before the decoder layer owning it.

    It holds the conditioning of the current forward pass (visual tokens, ``<image>`` positions),
    set by ``MediaConditioner``; plain attributes, never part of the state dict.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clear()

    def clear(self) -> None:
        self.vis_x: torch.Tensor | None = None
        self.media_locations: torch.Tensor | None = None
        self.use_cached_media = False

    def is_conditioned(self) -> bool:
        return self.vis_x is not None and self.media_locations is not None

    def before_decoder_layer(self, layer: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of the decoder layer: replace its hidden states by this block's output."""
        if self.vis_x is None or self.media_locations is None:
            raise RuntimeError("cross-attention is not conditioned on images: call the Flamingo model "
                               "(forward/generate), not its lang_encoder directly")
        if args:
            return (self._run(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._run(kwargs["hidden_states"])}

    def _run(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden, self.vis_x, self.media_locations, self.use_cached_media)


def attach_cross_attention(lm: nn.Module, *, decoder_layers_attr_name: str, lang_dim: int, vis_dim: int,
                           every_n_layers: int, config: CrossAttentionConfig | None = None,
                           ) -> list[CrossAttentionLayer | None]:
    """Give every ``every_n_layers``-th decoder layer (1-based: layers n-1, 2n-1, ...) a
    ``gated_cross_attn_layer``; returns one entry per decoder layer (None where there is none)."""
    if every_n_layers < 1:
        raise UsageError(f"cross_attn_every_n_layers must be >= 1, got {every_n_layers}",
                         fix="use 1 (every layer), 2, 4, ...")
    out: list[CrossAttentionLayer | None] = []
    for index, layer in enumerate(get_submodule(lm, decoder_layers_attr_name)):
        if (index + 1) % every_n_layers:
            out.append(None)
            continue
        block = CrossAttentionLayer(dim=lang_dim, dim_visual=vis_dim, config=config)
        layer.gated_cross_attn_layer = block
        layer.register_forward_pre_hook(block.before_decoder_layer, with_kwargs=True)
        out.append(block)
    return out


class MediaConditioner:
    """Conditions the cross-attention blocks for one forward pass or one ``generate`` call.

    Registered as a forward pre-hook of the LM, it recomputes the ``<image>`` positions from the
    ``input_ids`` of every LM call. While vision features are cached (``generate``,
    ``cache_media``), a call without any ``<image>`` token (a decoding step) keeps the earlier
    positions and lets all its tokens attend to the last cached image, as OpenFlamingo does.
    """

    def __init__(self, layers: Sequence[CrossAttentionLayer | None], media_token_id: int) -> None:
        self.layers = [layer for layer in layers if layer is not None]
        self.media_token_id = media_token_id
        self.use_cached_vision_x = False

    def condition_vis_x(self, vis_x: torch.Tensor | None) -> None:
        for layer in self.layers:
            layer.vis_x = vis_x

    def condition_media_locations(self, media_locations: torch.Tensor | None) -> None:
        for layer in self.layers:
            layer.media_locations = media_locations

    def is_conditioned(self) -> bool:
        return all(layer.is_conditioned() for layer in self.layers)

    def clear(self) -> None:
        for layer in self.layers:
            layer.clear()

    def before_lm_forward(self, lm: nn.Module, args: tuple, kwargs: dict):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            if self.layers:
                raise ValueError("Flamingo needs input_ids (not inputs_embeds) to find the <image> tokens")
            return None
        media_locations = input_ids == self.media_token_id
        cached = self.use_cached_vision_x and self.is_conditioned() and not bool(media_locations.any())
        for layer in self.layers:
            if not cached:
                layer.media_locations = media_locations
            layer.use_cached_media = cached
        return None
