"""validate(source, model=...) -> ValidationReport: the main job, one verdict.

For a hub source (``hf://ORG/NAME[@REV]/PATH``, or ``ORG/NAME`` with a revision and the preset's
file name) the revision is resolved to one commit first and everything after uses that commit:
the checkpoint is inspected and diffed remotely against the target's key listing (a wrong model
shows before a byte of the weights is downloaded; for a preset the listing is shipped data, so
nothing is built and torch is not imported), then downloaded resumably and sha256-verified.
Then, locally: inspect, diff, and optionally convert to safetensors (verified) and load into the
model (verified; the model is built only here), with a provenance summary when the model is built
for real. A local source skips the hub steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .convert import convert_to_safetensors
from .diff import KeyReport, compare
from .errors import LoadRefusedError, OutputExistsError, UsageError
from .formats import open_checkpoint
from .hub import download as fetch
from .inspect import InspectReport
from .inspect import listing as inspect_listing
from .load import load_checkpoint
from .presets import get_preset
from .provenance import ProvenanceReport, WeightSource, provenance_report
from .remap import coerce_rules
from .side import Side
from .sources import HfReference, hub_reference
from .targets import (
    TargetOptions,
    TargetSpec,
    build_model,
    checkpoint_side,
    module_side,
    parse_target,
    target_side,
)


@dataclass
class RemoteCheck:
    """What was learnt about a hub checkpoint before downloading it."""

    reference: str   # as the user gave it
    pinned: str      # hf://ORG/NAME@<commit>/PATH
    commit: str
    bytes_fetched: int | None
    keys: KeyReport
    files: list[str] = field(default_factory=list)  # the repo's files the checkpoint is (an index: its shards too)

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
                 device: str = "meta", options: TargetOptions | None = None) -> Target:
    """The model to check against, built: any target ``--model`` takes (a preset's skeleton, a
    transformers config's, a timm or open_clip architecture, a factory's), or a config's factory
    build (``--model`` then names the preset that still supplies the expectations, hints and
    post-load checks)."""
    _check_given(model, model_config)
    if model_config is None:
        built = build_model(model, device=device, options=options)
        return Target(built.model, built.preset, built.label, built.full)
    preset = _config_preset(model, options)
    built = build_model(TargetSpec("model-config", str(model_config), path=Path(model_config)), device=device)
    return Target(built.model, preset, preset.name if preset else built.label, built.full)


def _check_given(model, model_config) -> None:
    if model is None and model_config is None:
        raise UsageError("give a model (--model) or a model config (--model-config)",
                         fix="e.g. --model openflamingo-3b-vitl-mpt1b")


def _config_preset(model: str | None, options: TargetOptions | None):
    """Beside --model-config, --model names the preset whose expectations apply."""
    if model is None:
        return None
    spec = parse_target(model, options)
    if spec.kind != "preset":
        raise UsageError("with --model-config, --model names the preset whose expectations apply",
                         path=model, fix="give the model either as --model TARGET or as --model-config FILE")
    return get_preset(spec.name)


def target_listing(model: str | None = None, model_config: str | Path | None = None, *,
                   options: TargetOptions | None = None) -> Side:
    """The target's key listing: for a preset the data it ships (nothing is built or imported), for
    another target its cached listing; a model config is built (on meta) by its factory."""
    _check_given(model, model_config)
    if model_config is None:
        return target_side(parse_target(model, options))
    target = build_target(model, model_config, options=options)
    side = module_side(target.model, label=target.label)
    side.preset = target.preset
    return side


def _preset_filename(model: str | None, options: TargetOptions) -> str | None:
    """The checkpoint file a preset names, for a SOURCE given as ORG/NAME."""
    if model is None:
        return None
    spec = parse_target(model, options)
    return get_preset(spec.name).filename if spec.kind == "preset" else None


def validate(source: str | Path, *, model: str | None = None, model_config: str | Path | None = None,
             remap=None, expect_missing: Sequence[str] = (), require: Sequence[str] = (),
             load: bool = False, force: bool = False, device: str = "meta", load_device: str | None = None,
             revision: str | None = None, endpoint: str | None = None, token: str | None = None,
             cache_dir: str | Path | None = None, lock: str | Path | None = None,
             convert: str | Path | None = None, overwrite: bool = False,
             allow_random: bool = False, select: str | None = None, inert: bool = False,
             model_class: str | None = None, trust_remote_code: bool = False, auto_remap: bool = False,
             allow_nonfinite: bool = False) -> ValidationReport:
    """Validate a checkpoint against the model it is meant for; see the module docstring.

    ``model``: any target ``diff_keys`` takes as a string (a preset, a transformers folder,
    config.json or hf://ORG/NAME, timm:NAME, open_clip:NAME, package.module:callable);
    ``model_class``/``trust_remote_code``: how a transformers target is built. The key checks use
    the target's listing (a preset's shipped data: no model is built); the model is built only to
    load into. ``device``: where the target model is built for a load (``meta``: a skeleton;
    tensors loaded into it are materialised on ``load_device``, default cpu). ``convert``: also
    write a verified ``.safetensors`` there (and load from it); an existing file there is replaced
    only with ``overwrite`` (as ``ckpt convert --force``). ``force``: go on past a failing key
    check. ``allow_random``: a model built for real may keep randomly initialised parameters after
    the load (by default any such parameter fails the verdict). ``select``/``inert``: as
    ``open_checkpoint``, for every read of the checkpoint. ``auto_remap``: apply the remap rules
    inferred when keys do not match, in the diff, the conversion and the load (always reported).
    ``allow_nonfinite``: a loaded NaN or Inf is not a problem (by default it fails the verdict).
    """
    _check_given(model, model_config)  # usage errors come before anything is opened
    building = TargetOptions(model_class, trust_remote_code, endpoint, token)
    if model_config is not None:
        _config_preset(model, building)
    options = {"remap": remap, "expect_missing": expect_missing, "require": require, "auto_remap": auto_remap}
    reading = {"select": select, "inert": inert}
    ref = hub_reference(str(source), revision=revision, filename=_preset_filename(model, building))
    remote = download = side = None
    local = source
    if ref is not None:
        side = target_listing(model, model_config, options=building)
        remote = _remote_check(ref, str(source), side, endpoint, token, options, reading)
        if not remote.keys.ok and not force:
            return ValidationReport(str(source), remote.keys.target, _remote_listing(remote),
                                    remote.keys, remote=remote,
                                    stopped="the key check failed before download (pass --force to download anyway)")
        download = fetch(ref.repo_id, remote.files, revision=ref.revision, pinned=remote.commit,
                         cache_dir=cache_dir, endpoint=endpoint, token=token, lock=lock)
        local = download.files[0].local_path

    # the listing read for the remote check serves the local diff too
    def listing() -> Side:
        return side if side is not None else target_listing(model, model_config, options=building)

    def make_model() -> Target:
        return build_target(model, model_config, device=device, options=building)

    report = _validate_local(local, str(source), listing, make_model, options, load=load, force=force,
                             device=device, load_device=load_device, convert=convert, overwrite=overwrite,
                             reading=reading, allow_nonfinite=allow_nonfinite,
                             origin=_origin(ref, remote, download, local), allow_random=allow_random)
    report.remote, report.download = remote, download
    return report


def _remote_listing(remote: RemoteCheck) -> InspectReport:
    """What a validation stopped before download says of the file: where it is and what was read."""
    return InspectReport(source=remote.pinned, format="hub", wrapper=None, tensors={},
                         bytes_read=remote.bytes_fetched)


def _remote_check(ref, given: str, side: Side, endpoint, token, options, reading) -> RemoteCheck:
    """Pin the revision and diff the remote listing against the target's."""
    with open_checkpoint(ref, endpoint=endpoint, token=token, **reading) as ckpt:
        commit = ckpt.commit
        keys = compare(checkpoint_side(ckpt), side, **options)
        fetched = ckpt.bytes_read
        files = [ref.path] + [ref.sibling(name).path for name in getattr(ckpt, "shards", {})]
    pinned = str(HfReference(ref.repo_id, commit, ref.path))
    return RemoteCheck(given, pinned, commit, fetched, keys, files)


def _origin(ref, remote: RemoteCheck | None, download, local) -> Any:
    """Where the checkpoint's tensors come from, for provenance."""
    if ref is None:
        return WeightSource("checkpoint", Path(str(local)).name)
    return WeightSource("checkpoint", f"{ref.repo_id}/{ref.path}", revision=remote.commit,
                        sha256=download.files[0].sha256)


def _validate_local(local, given: str, make_listing: Callable[[], Side], make_model: Callable[[], Target],
                    options: dict, *, load: bool, force: bool, device: str, load_device: str | None, convert,
                    overwrite: bool, reading: dict, allow_nonfinite: bool, origin,
                    allow_random: bool = False) -> ValidationReport:
    with open_checkpoint(local, **reading) as ckpt:  # a bad file is reported before the target is read
        side = make_listing()
        listing = inspect_listing(ckpt, given)
        keys = compare(checkpoint_side(ckpt), side, **options)
    report = ValidationReport(given, side.label, listing, keys)
    if not load and convert is None:
        return report
    load_from = local
    if convert is not None and not keys.ok and not force:
        report.stopped = "the key check failed: not converted (pass --force to convert anyway)"
    elif convert is not None:
        inferred = list(keys.inference.rules) if keys.auto_remapped else []
        rules = coerce_rules(options["remap"]) + inferred
        try:
            report.conversion = convert_to_safetensors(local, convert, rules=rules, force=overwrite, **reading)
        except OutputExistsError as exc:
            if exc.fix and "--force" in exc.fix:  # validate's --force means something else
                exc.fix = exc.fix.replace("--force", "--overwrite (overwrite=True)")
            raise
        report.conversion.inferred_rules = [rule.to_dict() for rule in inferred]  # as `ckpt convert --auto-remap` says
        reading = {}  # the converted file is one state dict
        # it has the remapped names already: only the target's own (preset) rules still apply
        options = {**options, "remap": None, "auto_remap": False}
        load_from = convert
    if load:
        target = make_model()
        report.built = target.built
        try:
            report.keys = load_checkpoint(load_from, target.model, **options, **reading, force=force, preset=target.preset,
                                          device=load_device, provenance=origin, allow_nonfinite=allow_nonfinite)
        except LoadRefusedError as exc:
            exc.report.target = target.label
            report.keys, report.refused = exc.report, exc.message
        report.keys.target = target.label
        if device != "meta":  # built for real: whatever the checkpoint did not fill is random
            report.provenance = _provenance(target, expect_complete=not allow_random)
    return report


def _provenance(target: Target, *, expect_complete: bool) -> ProvenanceReport:
    split = tuple((target.preset.info or {}).get("provenance_split", ())) if target.preset else ()
    return provenance_report(target.model, split=split, expect_complete=expect_complete)
