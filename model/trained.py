"""The trained part of a Flamingo model, as OpenFlamingo's training saves it.

OpenFlamingo v2 writes ``checkpoint.pt`` with only what training changed: the resampler, the
gated cross-attention blocks and the LM's input embedding (its filter keeps parameters that
require grad plus any whose name contains "embed", and drops the vision encoder). The published
files therefore hold ``perceiver.*``, ``lang_encoder.<blocks>.<i>.gated_cross_attn_layer.*`` and
the input embedding, nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

# small enough that a tiny model's activations stay tame, large enough to look trained
_WEIGHT_STD = 0.02
_GATE_RANGE = (0.1, 0.5)  # tanh(gate) > 0: the blocks really change the LM's output


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the trained parameters, one name per tensor (tied weights once),
    in OpenFlamingo v2's checkpoint layout."""
    return {name: param.detach() for name, param in model.named_parameters()
            if (param.requires_grad or "embed" in name) and not name.startswith("vision_encoder.")}


def make_trained_looking(model: nn.Module, seed: int = 0) -> list[str]:
    """Fill the trained parameters (see ``trained_state_dict``) with deterministic values shaped
    like trained ones: small normal weights, layer norms near 1, gates open (0.1..0.5), so a
    checkpoint made from it loads, verifies and conditions generation like a real one. Returns the
    names filled."""
    generator = torch.Generator().manual_seed(seed)
    norms = {f"{path}.{kind}" for path, module in model.named_modules() if isinstance(module, nn.LayerNorm)
             for kind in ("weight", "bias")}
    names = list(trained_state_dict(model))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            param = params[name]
            param.copy_(_trained_value(name, tuple(param.shape), name in norms, generator))
    return names


def _trained_value(name: str, shape: tuple[int, ...], is_norm: bool, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("_gate"):
        low, high = _GATE_RANGE
        return low + (high - low) * torch.rand(shape, generator=generator)
    noise = torch.randn(shape, generator=generator) * _WEIGHT_STD
    return noise + 1.0 if is_norm and name.endswith(".weight") else noise
