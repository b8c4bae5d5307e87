"""validate(source, model=...) -> ValidationReport: the main job, one verdict.

For a hub source (``hf://ORG/NAME[@REV]/PATH``, or ``ORG/NAME`` with a revision and the preset's
file name) the revision is resolved to one commit first and everything after uses that commit:
the checkpoint is inspected and diffed remotely (a wrong model shows before a byte of the weights
is downloaded), then downloaded resumably and sha256-verified. Then, locally: inspect, diff, and
optionally convert to safetensors (verified) and load into the model (verified), with a
provenance summary when the model is built for real. A local source skips the hub steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .convert import convert_to_safetensors
from .diff import KeyReport, compare
from .errors import LoadRefusedError, UsageError
from .formats import open_checkpoint
from .hub import download as fetch
from .inspect import InspectReport
from .inspect import listing as inspect_listing
from .load import load_checkpoint
from .modelconfig import build_from_config
from .presets import get_preset
from .provenance import ProvenanceReport, WeightSource, provenance_report
from .remap import coerce_rules
from .sources import HfReference, hub_reference
from .targets import checkpoint_side, module_side


@dataclass
class RemoteCheck:
    """What was learnt about a hub checkpoint before downloading it."""

    reference: str   # as the user gave it
    pinned: str      # hf://ORG/NAME@<commit>/PATH
    commit: str
    bytes_fetched: int | None
    keys: KeyReport

    def to_dict(self) -> dict:
        return {"reference": self.reference, "pinned": self.pinned, "commit": self.commit,
                "bytes_fetched": self.bytes_fetched, "verdict": self.keys.verdict}

    def line(self) -> str:
        fetched = f"{self.bytes_fetched:,} bytes fetched" if self.bytes_fetched is not None else "listed"
        return f"remote: pinned {self.pinned} ({fetched}); key check before download: {self.keys.verdict}"


@dataclass
class ValidationReport:
    html_kind = "validate"  # the page ckpt_tools.html renders for it (--format html)

    source: str
    target: str
    inspect: Any  # an InspectReport
    keys: KeyReport
    refused: str | None = None  # why a requested load was refused
    remote: RemoteCheck | None = None
    download: Any = None  # DownloadResult
    conversion: Any = None  # ConversionResult
    provenance: Any = None  # ProvenanceReport
    stopped: str | None = None  # why the flow stopped early
    built: tuple | None = field(default=None, repr=False)  # (model, image_processor, tokenizer) when built

    @property
    def verdict(self) -> str:
        checks = [
            self.refused is None, self.stopped is None, self.keys.ok,
            self.keys.load is None or bool(self.keys.load.get("verified")),
            self.conversion is None or bool(self.conversion.verified),
            self.provenance is None or self.provenance.verdict == "ok",
        ]
        return "ok" if all(checks) else "fail"

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
        for name in ("remote", "download", "conversion", "provenance"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.to_dict()
        if self.stopped:
            out["stopped"] = self.stopped
        return out

    def verdict_line(self) -> str:
        line = f"verdict: {self.verdict.upper()} ({self.keys.summary_line()})"
        if self.stopped:
            line += f"; stopped: {self.stopped}"
        if self.refused:
            line += "; load refused"
        elif self.keys.load is not None:
            line += f"; loaded {self.keys.load['loaded']}, verified: {str(self.keys.load['verified']).lower()}"
        if self.provenance is not None:
            line += f"; randomly initialised: {self.provenance.random_params:,} parameters"
        return line

    def step_lines(self) -> list[str]:
        lines = [self.remote.line()] if self.remote else []
        if self.download is not None:
            for f in self.download.files:
                resumed = f", resumed from {f.resumed_from:,}" if f.resumed_from else ""
                lines.append(f"download: {f.path} @ {self.download.commit[:12]}: {f.size:,} bytes, sha256 "
                             f"{f.sha256[:16]}… verified ({f.bytes_transferred:,} transferred{resumed})")
        if self.conversion is not None:
            c = self.conversion
            lines.append(f"convert: {c.destination} ({c.bytes_written:,} bytes, "
                         f"{'verified bit for bit' if c.verified else 'NOT verified'})")
        if self.provenance is not None:
            lines.append(f"provenance: {self.provenance.summary()}")
        return lines

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        parts = [Text("inspect", style="bold"), *(Text(line) for line in self.inspect._summary_lines())]
        parts += [Text(line) for line in self.step_lines()]
        parts += [Text(""), self.keys.rich_table(with_verdict=False)]
        if self.provenance is not None:
            parts.append(self.provenance.rich_table())
        if self.refused:
            parts.append(Text(f"load refused: {self.refused}", style="red"))
        parts.append(Text(self.verdict_line(), style="bold green" if self.ok else "bold red"))
        return Group(*parts)

    def to_markdown(self) -> str:
        summary = "\n".join(f"- {line}" for line in self.inspect._summary_lines() + self.step_lines())
        text = f"## Validation: **{self.verdict}**\n\n{summary}\n\n{self.keys.to_markdown()}"
        if self.provenance is not None:
            text += "\n" + self.provenance.to_markdown() + "\n"
        if self.refused:
            text += f"\nLoad refused: {self.refused}\n"
        return text + f"\n**{self.verdict_line()}**\n"


@dataclass
class Target:
    model: Any
    preset: Any
    label: str
    built: tuple | None = None  # the factory's whole result, when a factory built it


def build_target(model: str | None = None, model_config: str | Path | None = None, *,
                 device: str = "meta") -> Target:
    """The model to check against: a preset's skeleton, or a config's factory build (the preset, when
    both are given, still supplies the expectations, hints and post-load checks)."""
    if model is None and model_config is None:
        raise UsageError("give a model preset (--model) or a model config (--model-config)",
                         fix="e.g. --model openflamingo-3b-vitl-mpt1b")
    preset = get_preset(model) if model is not None else None
    if model_config is None:
        return Target(preset.build(device=device), preset, preset.name)
    built = build_from_config(model_config, device=device, full=True)
    module = built[0] if isinstance(built, tuple) else built
    return Target(module, preset, preset.name if preset else str(model_config),
                  built if isinstance(built, tuple) else (built,))


def validate(source: str | Path, *, model: str | None = None, model_config: str | Path | None = None,
             remap=None, expect_missing: Sequence[str] = (), require: Sequence[str] = (),
             load: bool = False, force: bool = False, device: str = "meta", load_device: str | None = None,
             revision: str | None = None, endpoint: str | None = None, token: str | None = None,
             cache_dir: str | Path | None = None, lock: str | Path | None = None,
             convert: str | Path | None = None, overwrite: bool = False,
             allow_random: bool = False, select: str | None = None, inert: bool = False,
             auto_remap: bool = False, allow_nonfinite: bool = False) -> ValidationReport:
    """Validate a checkpoint against the model it is meant for; see the module docstring.

    ``device``: where the target model is built (``meta``: a skeleton; tensors loaded into it are
    materialised on ``load_device``, default cpu). ``convert``: also write a verified
    ``.safetensors`` there (and load from it); an existing file there is replaced only with
    ``overwrite`` (as ``ckpt convert --force``). ``force``: go on past a failing key check.
    ``allow_random``: a model built for real may keep randomly initialised parameters after the
    load (by default any such parameter fails the verdict). ``select``/``inert``: as
    ``open_checkpoint``, for every read of the checkpoint. ``auto_remap``: apply the remap rules
    inferred when keys do not match, in the diff, the conversion and the load (always reported).
    ``allow_nonfinite``: a loaded NaN or Inf is not a problem (by default it fails the verdict).
    """
    if model is None and model_config is None:
        build_target(model, model_config)  # raises the usage error before anything is opened
    options = {"remap": remap, "expect_missing": expect_missing, "require": require, "auto_remap": auto_remap}
    reading = {"select": select, "inert": inert}
    ref = hub_reference(str(source), revision=revision, filename=get_preset(model).filename if model else None)
    remote = download = skeleton = None
    local = source
    if ref is not None:
        skeleton = build_target(model, model_config, device="meta")
        remote = _remote_check(ref, str(source), skeleton, endpoint, token, options, reading)
        if not remote.keys.ok and not force:
            return ValidationReport(str(source), remote.keys.target, _remote_listing(remote),
                                    remote.keys, remote=remote,
                                    stopped="the key check failed before download (pass --force to download anyway)")
        download = fetch(ref.repo_id, [ref.path], revision=remote.commit, cache_dir=cache_dir,
                         endpoint=endpoint, token=token, lock=lock)
        local = download.files[0].local_path
    # a meta skeleton is only read by a diff and only materialised tensor by tensor by a load, so the
    # one built for the remote check serves the local steps too
    def target() -> Target:
        if skeleton is not None and device == "meta":
            return skeleton
        return build_target(model, model_config, device=device)

    report = _validate_local(local, str(source), target, options, load=load, force=force,
                             device=device, load_device=load_device, convert=convert, overwrite=overwrite,
                             reading=reading, allow_nonfinite=allow_nonfinite,
                             origin=_origin(ref, remote, download, local), allow_random=allow_random)
    report.remote, report.download = remote, download
    return report


def _remote_listing(remote: RemoteCheck) -> InspectReport:
    """What a validation stopped before download says of the file: where it is and what was read."""
    return InspectReport(source=remote.pinned, format="hub", wrapper=None, tensors={},
                         bytes_read=remote.bytes_fetched)


def _remote_check(ref, given: str, skeleton: Target, endpoint, token, options, reading) -> RemoteCheck:
    """Pin the revision and diff the remote listing against the skeleton (meta device)."""
    with open_checkpoint(ref, endpoint=endpoint, token=token, **reading) as ckpt:
        commit = ckpt.commit
        keys = _diff(ckpt, skeleton, options)
        fetched = ckpt.bytes_read
    pinned = str(HfReference(ref.repo_id, commit, ref.path))
    return RemoteCheck(given, pinned, commit, fetched, keys)


def _diff(ckpt, target: Target, options: dict) -> KeyReport:
    side = module_side(target.model, label=target.label)
    side.preset = target.preset
    return compare(checkpoint_side(ckpt), side, **options)


def _origin(ref, remote: RemoteCheck | None, download, local) -> Any:
    """Where the checkpoint's tensors come from, for provenance."""
    if ref is None:
        return WeightSource("checkpoint", Path(str(local)).name)
    return WeightSource("checkpoint", f"{ref.repo_id}/{ref.path}", revision=remote.commit,
                        sha256=download.files[0].sha256)


def _validate_local(local, given: str, make_target: Callable[[], Target], options: dict, *, load: bool, force: bool,
                    device: str, load_device: str | None, convert, overwrite: bool, reading: dict,
                    allow_nonfinite: bool, origin,
                    allow_random: bool = False) -> ValidationReport:
    with open_checkpoint(local, **reading) as ckpt:  # a bad file is reported before the model is built
        target = make_target()
        listing = inspect_listing(ckpt, given)
        if not load and convert is None:
            return ValidationReport(given, target.label, listing, _diff(ckpt, target, options), built=target.built)
        keys = _diff(ckpt, target, options)
    report = ValidationReport(given, target.label, listing, keys, built=target.built)
    load_from = local
    if convert is not None and not keys.ok and not force:
        report.stopped = "the key check failed: not converted (pass --force to convert anyway)"
    elif convert is not None:
        rules = coerce_rules(options["remap"]) + (list(keys.inference.rules) if keys.auto_remapped else [])
        report.conversion = convert_to_safetensors(local, convert, rules=rules, force=overwrite, **reading)
        # the converted file has the remapped names already: only the preset's own rules still apply
        options = {**options, "remap": None, "auto_remap": False}
        reading = {}  # the converted file is one state dict
        load_from = convert
    if load:
        try:
            report.keys = load_checkpoint(load_from, target.model, **options, **reading, force=force, preset=target.preset,
                                          device=load_device, provenance=origin, allow_nonfinite=allow_nonfinite)
        except LoadRefusedError as exc:
            exc.report.target = target.label
            report.keys, report.refused = exc.report, exc.message
        report.keys.target = target.label
        if target.built is not None and device != "meta":
            report.provenance = _provenance(target, expect_complete=not allow_random)
    return report


def _provenance(target: Target, *, expect_complete: bool) -> ProvenanceReport:
    split = tuple((target.preset.info or {}).get("provenance_split", ())) if target.preset else ()
    return provenance_report(target.model, split=split, expect_complete=expect_complete)
