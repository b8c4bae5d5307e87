"""validate(source, model=...) -> ValidationReport: inspect + key diff (+ a verified load), one verdict.

The core of ``ckpt validate``: open the checkpoint once, list it (no tensor bytes), build the target
model from a preset or a model-config file (on the meta device unless told otherwise), diff, and
with ``load=True`` load into that model and verify. Later steps (hub download, conversion,
provenance) wrap this function rather than reimplement it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .diff import KeyReport, checkpoint_side, compare, module_side
from .errors import LoadRefusedError, UsageError


@dataclass
class ValidationReport:
    source: str
    target: str
    inspect: Any  # an InspectReport
    keys: KeyReport
    refused: str | None = None  # why a requested load was refused

    @property
    def verdict(self) -> str:
        if self.refused or not self.keys.ok:
            return "fail"
        if self.keys.load is not None and not self.keys.load.get("verified"):
            return "fail"
        return "ok"

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def to_dict(self) -> dict:
        out = {"verdict": self.verdict, "source": self.source, "target": self.target,
               "inspect": self.inspect.to_dict(), "diff": self.keys.to_dict()}
        if self.refused:
            out["load"] = {"refused": self.refused, "loaded": 0, "verified": False}
        elif self.keys.load is not None:
            out["load"] = dict(self.keys.load)
        return out

    def verdict_line(self) -> str:
        line = f"verdict: {self.verdict.upper()} ({self.keys.summary_line()})"
        if self.refused:
            line += "; load refused"
        elif self.keys.load is not None:
            line += f"; loaded {self.keys.load['loaded']}, verified: {str(self.keys.load['verified']).lower()}"
        return line

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        parts = [Text("inspect", style="bold"), *(Text(line) for line in self.inspect._summary_lines()),
                 Text(""), self.keys.rich_table(with_verdict=False)]
        if self.refused:
            parts.append(Text(f"load refused: {self.refused}", style="red"))
        parts.append(Text(self.verdict_line(), style="bold green" if self.ok else "bold red"))
        return Group(*parts)

    def to_markdown(self) -> str:
        summary = "\n".join(f"- {line}" for line in self.inspect._summary_lines())
        text = f"## Validation: **{self.verdict}**\n\n{summary}\n\n{self.keys.to_markdown()}"
        if self.refused:
            text += f"\nLoad refused: {self.refused}\n"
        return text + f"\n**{self.verdict_line()}**\n"


def build_target(model: str | None = None, model_config: str | Path | None = None, *,
                 device: str = "meta") -> tuple[Any, Any, str]:
    """(module, preset or None, label) for a preset name or a model-config file."""
    if (model is None) == (model_config is None):
        raise UsageError("give exactly one of a model preset (--model) or a model config (--model-config)",
                         fix="e.g. --model openflamingo-3b-vitl-mpt1b")
    if model is not None:
        from .presets import get_preset

        preset = get_preset(model)
        return preset.build(device=device), preset, preset.name
    from .modelconfig import build_from_config

    return build_from_config(model_config, device=device), None, str(model_config)


def validate(source: str | Path, *, model: str | None = None, model_config: str | Path | None = None,
             remap=None, expect_missing: Sequence[str] = (), require: Sequence[str] = (),
             load: bool = False, force: bool = False, device: str = "meta",
             load_device: str | None = None) -> ValidationReport:
    """Inspect ``source``, diff it against the model a preset or config builds, optionally load it.

    ``device``: where the target model is built (``meta``: a skeleton; tensors loaded into it are
    materialised on ``load_device``, default cpu, and the rest stay on meta).
    """
    from .inspect import InspectReport
    from .load import load_checkpoint
    from .reader import open_checkpoint

    if (model is None) == (model_config is None):
        build_target(model, model_config)  # raises the usage error before anything is opened
    with open_checkpoint(source) as ckpt:
        target, preset, label = build_target(model, model_config, device=device)
        listing = InspectReport(source=str(source), format=ckpt.format, wrapper=ckpt.wrapper,
                                tensors=ckpt.metas(), aliases=[list(g) for g in ckpt.aliases],
                                extras=dict(ckpt.extras), metadata=dict(ckpt.metadata),
                                notes=list(ckpt.notes), bytes_read=getattr(ckpt, "bytes_read", None))
        if not load:
            side = module_side(target, label=label)
            side.preset = preset
            keys = compare(checkpoint_side(ckpt), side, remap=remap, expect_missing=expect_missing,
                           require=require)
            return ValidationReport(str(source), label, listing, keys)
        try:
            keys = load_checkpoint(target, ckpt, remap=remap, expect_missing=expect_missing, require=require,
                                   force=force, preset=preset, device=load_device)
        except LoadRefusedError as exc:
            exc.report.target = label
            return ValidationReport(str(source), label, listing, exc.report, refused=exc.message)
    keys.target = label
    return ValidationReport(str(source), label, listing, keys)
