"""Tiny models for the diff and load tests: an OpenFlamingo-like shape in a few hundred parameters.

``Tiny(every=n)``: a frozen ``vision`` tower, a trained embedding tied to the output head, four
frozen decoder blocks with a trained gated cross-attention block before every n-th one (layers
n-1, 2n-1, ...), a persistent and a non-persistent buffer.
"""

from __future__ import annotations

import torch
from torch import nn

from ckpt_tools.meta import TensorMeta


class XAttn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))
        self.proj = nn.Linear(dim, dim)


class Block(nn.Module):
    def __init__(self, dim: int, xattn: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.x = XAttn(dim) if xattn else None


class Tiny(nn.Module):
    def __init__(self, every: int = 1, vocab: int = 10, dim: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.vision = nn.Linear(dim, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, (i + 1) % every == 0) for i in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("stat", torch.zeros(3))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.vision.requires_grad_(False)
        for block in self.blocks:
            block.lin.requires_grad_(False)


def build_tiny(every: int = 1, vocab: int = 10, device: str | None = None, seed: int | None = None) -> Tiny:
    with torch.device(device or "cpu"):
        if seed is not None:
            torch.manual_seed(seed)
        model = Tiny(every=every, vocab=vocab)
    return model


def trained_state(model: nn.Module, *, gate: float = 0.5) -> dict[str, torch.Tensor]:
    """What a training script saves: the trained tensors (gates made non-zero), head/embed tied."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
             if isinstance(v, nn.Parameter) and v.requires_grad}
    for key in state:
        if key.endswith(".gate"):
            state[key] = torch.full((1,), gate)
    return state


def metas(state) -> dict[str, TensorMeta]:
    return {k: TensorMeta.from_tensor(k, v) for k, v in state.items()}
