"""The Flamingo model: open_clip vision tower -> Perceiver resampler -> cross-attention in a causal LM.

A drop-in for OpenFlamingo v2's ``Flamingo``: same constructor arguments, same ``forward`` and
``generate`` signatures and results, and the same parameter names for everything a published
checkpoint holds (``perceiver.*``, ``lang_encoder.<decoder path>.N.gated_cross_attn_layer.*`` and the
LM's own names), with each tensor under one name only.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .config import CrossAttentionConfig, ResamplerConfig, lang_hidden_size
from .flamingo_lm import MediaConditioner, attach_cross_attention, resolve_decoder_layers_attr_name
from .perceiver import PerceiverResampler


class Flamingo(nn.Module):
    def __init__(self, vision_encoder: nn.Module, lang_encoder: nn.Module, eoc_token_id: int,
                 media_token_id: int, vis_dim: int, cross_attn_every_n_layers: int = 1,
                 gradient_checkpointing: bool = False, *, decoder_layers_attr_name: str | None = None,
                 resampler: ResamplerConfig | None = None,
                 cross_attention: CrossAttentionConfig | None = None) -> None:
        """vision_encoder: an open_clip model (its ``.visual`` is used) or the visual tower itself;
        lang_encoder: a Hugging Face causal LM; decoder_layers_attr_name: where its decoder blocks
        live (found from the LM family, or structurally, when None)."""
        super().__init__()
        self.eoc_token_id = eoc_token_id
        self.media_token_id = media_token_id
        self.vis_dim = vis_dim
        self.lang_dim = lang_hidden_size(lang_encoder.config)
        self.cross_attn_every_n_layers = cross_attn_every_n_layers
        visual = getattr(vision_encoder, "visual", vision_encoder)
        visual.output_tokens = True  # the resampler reads patch tokens, not the pooled embedding
        self.vision_encoder = visual
        self.perceiver = PerceiverResampler(dim=vis_dim, config=resampler)
        self.lang_encoder = lang_encoder
        self.decoder_layers_attr_name = resolve_decoder_layers_attr_name(lang_encoder, decoder_layers_attr_name)
        layers = attach_cross_attention(lang_encoder, decoder_layers_attr_name=self.decoder_layers_attr_name,
                                        lang_dim=self.lang_dim, vis_dim=vis_dim,
                                        every_n_layers=cross_attn_every_n_layers, config=cross_attention)
        # a plain attribute, not a submodule: the blocks are already named under the decoder layers
        self._media = MediaConditioner(layers, media_token_id)
        lang_encoder.register_forward_pre_hook(self._media.before_lm_forward, with_kwargs=True)
        self._use_gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            _enable_activation_checkpointing(lang_encoder)

    @property
    def gated_cross_attn_layers(self) -> list[nn.Module]:
        """The cross-attention blocks, in decoder order (a view, not a second name in the state dict)."""
        return list(self._media.layers)

    def forward(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                clear_conditioned_layers: bool = True, past_key_values=None, use_cache: bool = False):
        """vision_x ``(B, T_img, F, C, H, W)`` with F = 1; lang_x token ids ``(B, T_txt)`` with one
        ``<image>`` token per image. Returns the LM's output (``.logits``, ``.loss`` with labels)."""
        if self._media.use_cached_vision_x:
            if vision_x is not None:
                raise ValueError("media is cached (cache_media): pass vision_x=None, or call uncache_media() first")
            if not self._media.is_conditioned():
                raise ValueError("media is marked cached but nothing is conditioned; call cache_media() again")
        else:
            if vision_x is None:
                raise ValueError("pass vision_x, or cache images first with cache_media()")
            self._encode_vision_x(vision_x)
            self._media.condition_media_locations(lang_x == self.media_token_id)
        lm_kwargs = {"input_ids": lang_x, "attention_mask": attention_mask, "labels": labels,
                     "use_cache": use_cache}
        if past_key_values is not None:
            lm_kwargs[self._cache_argument()] = past_key_values
        try:
            return self.lang_encoder(**lm_kwargs)
        finally:
            if clear_conditioned_layers:
                self._media.clear()

    @torch.no_grad()
    def generate(self, vision_x: torch.Tensor, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs):
        """Hugging Face ``generate`` (greedy, sampling, beams...) conditioned on the images; stops at
        ``<|endofchunk|>`` unless ``eos_token_id`` is given. Returns prompt + generated ids."""
        num_beams = kwargs.pop("num_beams", 1)
        if num_beams > 1:
            vision_x = vision_x.repeat_interleave(num_beams, dim=0)
        eos_token_id = kwargs.pop("eos_token_id", self.eoc_token_id)
        self._media.use_cached_vision_x = True
        try:
            self._encode_vision_x(vision_x)
            return self.lang_encoder.generate(input_ids=lang_x, attention_mask=attention_mask,
                                              eos_token_id=eos_token_id, num_beams=num_beams, **kwargs)
        finally:
            self._media.clear()
            self._media.use_cached_vision_x = False

    def cache_media(self, input_ids: torch.Tensor, vision_x: torch.Tensor) -> None:
        """Condition on a prompt's images once; later ``forward(None, ...)`` calls attend to its last image."""
        self._encode_vision_x(vision_x)
        self._media.condition_media_locations(input_ids == self.media_token_id)
        self._media.use_cached_vision_x = True

    def uncache_media(self) -> None:
        self._media.clear()
        self._media.use_cached_vision_x = False

    def _cache_argument(self) -> str:
        # transformers 5 renames past_key_values to cache model by model
        parameters = inspect.signature(self.lang_encoder.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def _encode_vision_x(self, vision_x: torch.Tensor) -> None:
        if vision_x.ndim != 6:
            raise ValueError(f"vision_x must have shape (B, T_img, F, C, H, W), got {tuple(vision_x.shape)}")
        b, T, F = vision_x.shape[:3]
        if F != 1:
            raise ValueError(f"only single-frame media are supported (F=1), got F={F}")
        images = vision_x.flatten(0, 2)
        with torch.no_grad():
            tokens = self.vision_encoder(images)[1]
        tokens = tokens.reshape(b, T, F, *tokens.shape[1:])
        self._media.condition_vis_x(self.perceiver(tokens))


def _enable_activation_checkpointing(lm: nn.Module) -> None:
    # the cross-attention runs inside each decoder layer's call, so it is checkpointed with it
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
