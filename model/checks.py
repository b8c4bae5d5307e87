"""OpenFlamingo-specific explanations of checkpoint/model mismatches, and checks after a load.

A wrong ``cross_attn_every_n_layers`` shows up in a generic key diff only as missing and unexpected
cross-attention indices, and a wrong tokenizer as a shape mismatch of the embedding; these hints
name the setting that would make the file fit. All functions work on ``{name: meta}`` mappings
(anything with a ``.shape`` or a ``"shape"`` entry), so they run on headers and meta skeletons.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .config import FLAMINGO_SPECIAL_TOKENS, LM_FAMILIES, PAD_TOKEN

_XATTN = re.compile(r"^(?P<path>.+)\.(?P<index>\d+)\.gated_cross_attn_layer\.")


def _shape(meta: Any) -> tuple[int, ...]:
    shape = meta.get("shape") if isinstance(meta, Mapping) else getattr(meta, "shape", ())
    return tuple(int(s) for s in shape)


def xattn_layers(names) -> dict[str, list[int]]:
    """``{decoder path: sorted layer indices}`` of the cross-attention blocks among ``names``."""
    found: dict[str, set[int]] = {}
    for name in names:
        match = _XATTN.match(name)
        if match:
            found.setdefault(match["path"], set()).add(int(match["index"]))
    return {path: sorted(indices) for path, indices in found.items()}


def interval_of(indices: list[int], num_layers: int | None = None) -> int | None:
    """The ``cross_attn_every_n_layers`` that puts blocks exactly at ``indices`` (None: no such n)."""
    if not indices:
        return None
    n = indices[0] + 1
    expected = list(range(n - 1, (num_layers or indices[-1] + 1), n))
    return n if indices == expected else None


def _layer_list(indices: list[int]) -> str:
    if len(indices) <= 4:
        return ", ".join(map(str, indices))
    return f"{indices[0]}, {indices[1]}, ..., {indices[-1]}"


def _num_layers(names, decoder_path: str) -> int | None:
    pattern = re.compile(re.escape(decoder_path) + r"\.(\d+)\.")
    indices = [int(m[1]) for m in map(pattern.match, names) if m]
    return max(indices) + 1 if indices else None


def xattn_hints(ckpt: Mapping[str, Any], model: Mapping[str, Any]) -> list[dict]:
    ckpt_layers, model_layers = xattn_layers(ckpt), xattn_layers(model)
    if not ckpt_layers or not model_layers or ckpt_layers == model_layers:
        return []
    (model_path, model_indices), = list(model_layers.items())[:1]
    if model_path not in ckpt_layers:
        found = ", ".join(sorted(ckpt_layers))
        return [{"kind": "decoder_path",
                 "detail": f"the checkpoint's cross-attention lives under {found}; the model's under {model_path}",
                 "fix": "build the model with the language model family the checkpoint was trained with"}]
    indices = ckpt_layers[model_path]
    have = interval_of(model_indices, _num_layers(model, model_path))
    want = interval_of(indices)  # the checkpoint's LM may be deeper than the model's
    where = f"checkpoint has cross-attention at layers {_layer_list(indices)}"
    if want is None:
        return [{"kind": "cross_attn_every_n_layers",
                 "detail": f"{where}: no cross_attn_every_n_layers fits that pattern; the model has {have}",
                 "fix": "check that the checkpoint belongs to this model"}]
    return [{"kind": "cross_attn_every_n_layers",
             "detail": f"{where}: cross_attn_every_n_layers={want}; the model has {have}",
             "fix": f"build the model with cross_attn_every_n_layers={want}"}]


def _vocab_tensors() -> set[str]:
    """Tensors with one row per token: every family's input embedding and output head."""
    modules = {family.input_embedding for family in LM_FAMILIES.values()} | {"lm_head", "embed_out"}
    return {f"lang_encoder.{module}.weight" for module in modules}


def embedding_hints(ckpt: Mapping[str, Any], model: Mapping[str, Any]) -> list[dict]:
    """Embedding or output-head row counts that differ: the tokenizer length the file implies."""
    hints = []
    for name, meta in ckpt.items():
        if name not in model or name not in _vocab_tensors():
            continue
        have, want = _shape(model[name]), _shape(meta)
        if len(have) != 2 or len(want) != 2 or have == want:
            continue
        if have[1] != want[1]:
            hints.append({"kind": "language_model",
                          "detail": f"{name} is {want[1]} wide in the checkpoint and {have[1]} in the model",
                          "fix": "use the language model the checkpoint was trained with"})
            continue
        hints.append({"kind": "tokenizer_length",
                      "detail": f"{name} has {want[0]} rows in the checkpoint: a tokenizer of length "
                                f"{want[0]}; the model has {have[0]}",
                      "fix": f"use the checkpoint's tokenizer plus {', '.join(FLAMINGO_SPECIAL_TOKENS)} "
                             f"(and {PAD_TOKEN} if it has no pad token) so len(tokenizer) == {want[0]}, "
                             "then resize the embeddings"})
    return hints


def vision_hints(ckpt: Mapping[str, Any], model: Mapping[str, Any]) -> list[dict]:
    name = "perceiver.latents"
    if name not in ckpt or name not in model:
        return []
    want, have = _shape(ckpt[name]), _shape(model[name])
    if want[-1:] == have[-1:]:
        return []
    return [{"kind": "vision_encoder",
             "detail": f"the resampler is {want[-1]} wide in the checkpoint and {have[-1]} in the model",
             "fix": f"use a vision encoder of width {want[-1]} (ViT-L-14 has 1024)"}]


def hints(ckpt_metas: Mapping[str, Any], model_metas: Mapping[str, Any]) -> list[dict]:
    """Every OpenFlamingo-specific explanation of how ``ckpt_metas`` and ``model_metas`` differ."""
    return [*xattn_hints(ckpt_metas, model_metas), *embedding_hints(ckpt_metas, model_metas),
            *vision_hints(ckpt_metas, model_metas)]


# Checks on the values after a load (ckpt_tools.stats.run_checks): the gates start at exactly 0.0,
# so gates still all 0 mean the cross-attention weights never landed and the blocks leave the LM as it was.
VALUE_CHECKS = (
    {"name": "xattn_gates_trained", "globs": ["*.attn_gate", "*.ff_gate"], "kind": "not_all_zero",
     "detail": "every attn_gate/ff_gate is exactly 0.0: the cross-attention weights never landed",
     "fix": "check that the checkpoint holds trained weights (its *.gated_cross_attn_layer.* keys)"},
)
