"""``convert_fitting``: convert a checkpoint with the remap rules inferred against a target.

``ckpt convert SRC DST --auto-remap --model TARGET``: the key diff against the target infers the
rules that make the checkpoint's names fit (``infer.py``), and the conversion applies them after
the user's own; the result names every rule applied. Never silent: a checkpoint for which no rule
helps is converted with the user's rules alone, and the result says that nothing was inferred.
"""

from __future__ import annotations

from pathlib import Path

from .convert import ConversionResult, convert_to_dcp, convert_to_safetensors
from .diff import diff_keys
from .remap import coerce_rules
from .render import plural

WRITERS = {"safetensors": convert_to_safetensors, "dcp": convert_to_dcp}


def convert_fitting(src: str | Path, dst: str | Path, target, *, rules=None, select: str | None = None,
                    inert: bool = False, to: str = "safetensors", **convert_options) -> ConversionResult:
    """Convert ``src`` to ``to`` (safetensors or dcp) at ``dst`` with ``rules`` plus the rules
    inferred against ``target`` (anything ``diff_keys`` takes as a target)."""
    rules = coerce_rules(rules)
    report = diff_keys(src, target, remap=rules, select=select, inert=inert, auto_remap=True)
    inferred = list(report.inference.rules) if report.inference else []
    result = WRITERS[to](src, dst, rules=rules + inferred, select=select, inert=inert, **convert_options)
    result.inferred_rules = [rule.to_dict() for rule in inferred]
    result.notes.append(f"applied {plural(len(inferred), 'remap rule')} inferred against {report.target}" if inferred
                        else f"no remap rule inferred against {report.target}: converted with the given rules")
    if report.inference is not None and report.inference.ambiguous:
        result.notes.append(f"{plural(len(report.inference.ambiguous), 'pairing')} could go either way and "
                            "were left as they are (`ckpt diff` lists them)")
    if not report.ok:
        result.notes.append(f"warning: the written names still do not fit {report.target} "
                            f"({report.summary_line()}); `ckpt diff {dst} --model ...` shows where")
    return result
