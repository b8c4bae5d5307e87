"""Architecture settings and the per-LM-family facts the model package relies on.

The defaults are OpenFlamingo v2's: its ``Flamingo`` builds a resampler of depth 6 with 8 heads of
64, 64 latents and a x4 feed-forward, and gated cross-attention blocks with the same heads and
feed-forward. Changing them produces a model that published checkpoints do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

# Added to the tokenizer in this order, so token ids and embedding rows match the published files.
ENDOFCHUNK_TOKEN = "<|endofchunk|>"
MEDIA_TOKEN = "<image>"
PAD_TOKEN = "<PAD>"  # only when the tokenizer has no pad token (GPT-style tokenizers)
FLAMINGO_SPECIAL_TOKENS = (ENDOFCHUNK_TOKEN, MEDIA_TOKEN)


@dataclass(frozen=True)
class ResamplerConfig:
    """The Perceiver resampler that turns patch tokens into ``num_latents`` visual tokens per image."""

    depth: int = 6
    dim_head: int = 64
    heads: int = 8
    num_latents: int = 64
    ff_mult: int = 4
    max_num_media: int | None = None  # learned per-image time embeddings (unused by v2 checkpoints)
    max_num_frames: int | None = None  # learned per-frame embeddings (unused by v2 checkpoints)


@dataclass(frozen=True)
class CrossAttentionConfig:
    """The gated cross-attention block inserted before every n-th decoder layer."""

    dim_head: int = 64
    heads: int = 8
    ff_mult: int = 4
    # text attends only to the latest preceding image (v2), not to every earlier one
    only_attend_immediate_media: bool = True


@dataclass(frozen=True)
class LMFamily:
    """Where things live inside one family of Hugging Face causal LMs (dotted module paths)."""

    decoder_layers: str
    input_embedding: str
    # modules outside the decoder blocks that stay frozen (norms, output head, positions)
    other_modules: tuple[str, ...]


# Keyed by ``config.model_type``, which survives renamed classes and remote-code wrappers; the
# class-name matching OpenFlamingo used picked the wrong path for LMs with unexpected names.
LM_FAMILIES: dict[str, LMFamily] = {
    "mpt": LMFamily("transformer.blocks", "transformer.wte", ("transformer.norm_f", "lm_head")),
    # MosaicGPT: the remote-code class of anas-awadalla/mpt-1b-redpajama-200b
    "mosaic_gpt": LMFamily("transformer.blocks", "transformer.wte", ("transformer.ln_f", "lm_head")),
    # transformers 5 calls GPT-NeoX's output head lm_head; older files say embed_out
    "gpt_neox": LMFamily("gpt_neox.layers", "gpt_neox.embed_in",
                         ("gpt_neox.final_layer_norm", "lm_head", "embed_out")),
    "llama": LMFamily("model.layers", "model.embed_tokens", ("model.norm", "lm_head")),
    "opt": LMFamily("model.decoder.layers", "model.decoder.embed_tokens",
                    ("model.decoder.embed_positions", "model.decoder.final_layer_norm",
                     "model.decoder.project_in", "model.decoder.project_out", "lm_head")),
    "gpt2": LMFamily("transformer.h", "transformer.wte", ("transformer.wpe", "transformer.ln_f", "lm_head")),
    "gptj": LMFamily("transformer.h", "transformer.wte", ("transformer.ln_f", "lm_head")),
}


def lang_hidden_size(lm_config) -> int:
    """The LM width the cross-attention works at (MPT calls it ``d_model``)."""
    for attr in ("d_model", "hidden_size", "n_embd"):
        value = getattr(lm_config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of {type(lm_config).__name__}: no d_model/hidden_size")
