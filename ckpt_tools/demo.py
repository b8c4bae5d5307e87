"""``ckpt demo``: the main job end to end, offline, on a tiny OpenFlamingo published locally.

1. make base weights (a vision tower file, an LM folder) and a trained-parts ``checkpoint.pt``
   in the published layout, with the demo kit of the preset (``ModelPreset.info["demo"]``);
2. publish both to a hub folder and serve it with ``ckpt serve`` on a free loopback port;
3. ``validate`` the checkpoint as a user would a real one: pin the revision, inspect and diff it
   remotely, download it resumably and verified, diff, convert to safetensors, load into the
   model built from the hub (LM at a pinned commit) with verification and provenance;
4. generate a few tokens with the loaded model.

Everything lives in a temporary folder that is removed at the end (``keep`` keeps a copy).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CkptError, UsageError
from .fs import atomic_write
from .html import render_html
from .hub import download
from .presets import get_preset
from .render import markdown_table, plural, rich_table
from .server import publish
from .validation import validate
from .version import VERSION

DEFAULT_PRESET = "openflamingo-tiny"


@dataclass
class DemoStep:
    name: str
    detail: str
    seconds: float
    ok: bool = True

    def row(self) -> list[object]:
        return [self.name, "ok" if self.ok else "FAIL", f"{self.seconds:.1f}s", self.detail]


@dataclass
class DemoReport:
    preset: str
    steps: list[DemoStep] = field(default_factory=list)
    validation: Any = None  # ValidationReport
    generation: str = ""
    kept: str | None = None
    report_html: str | None = None  # the validation's HTML page, when the files are kept

    def where_line(self) -> str:
        """Where the files named above are: kept, or gone with the temporary folder."""
        if self.kept:
            return f"report: {self.report_html} (open it in a browser); every file is kept in {self.kept}"
        return ("the ckpt-demo-* paths above were in a temporary folder, removed now; "
                "`ckpt demo --keep DIR` keeps the files and writes DIR/report.html")

    @property
    def verdict(self) -> str:
        good = all(s.ok for s in self.steps) and self.validation is not None and self.validation.ok
        return "ok" if good else "fail"

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "preset": self.preset,
                "steps": [{"name": s.name, "ok": s.ok, "seconds": round(s.seconds, 3), "detail": s.detail}
                          for s in self.steps],
                "validation": self.validation.to_dict() if self.validation is not None else None,
                "generation": self.generation, "kept": self.kept, "report_html": self.report_html}

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [rich_table(f"ckpt demo ({self.preset})", ["step", "", "time", "what happened"],
                                       [s.row() for s in self.steps])]
        if self.validation is not None:
            parts += [Text(""), self.validation.rich_table()]
        parts.append(Text(self.where_line()))
        parts.append(Text(f"demo verdict: {self.verdict.upper()}", style="bold green" if self.ok else "bold red"))
        return Group(*parts)

    def to_markdown(self) -> str:
        text = f"## ckpt demo ({self.preset}): **{self.verdict}**\n\n"
        text += markdown_table(["step", "", "time", "what happened"], [s.row() for s in self.steps]) + "\n"
        if self.validation is not None:
            text += "\n" + self.validation.to_markdown()
        text += f"\n{self.where_line()}\n"
        return text


def _import(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _demo_kit(preset_name: str):
    preset = get_preset(preset_name)
    spec = (preset.info or {}).get("demo")
    if not spec:
        raise UsageError(f"preset {preset_name!r} has no demo kit (no info['demo'])",
                         fix=f"run the demo with preset={DEFAULT_PRESET!r}")
    return _import(spec)()


@contextlib.contextmanager
def served(folder: Path, timeout: float = 60.0) -> Iterator[str]:
    """Run ``ckpt serve FOLDER --port 0`` in a child process; yield its endpoint URL."""
    process = subprocess.Popen([sys.executable, "-m", "ckpt_tools", "serve", str(folder), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = _first_line(process, timeout)
        endpoint = next((w for w in line.split() if w.startswith("http://")), None)
        if endpoint is None:
            raise CkptError(f"`ckpt serve` did not report its address (said: {line.strip()!r})",
                            path=str(folder), fix="run `ckpt serve DIR --port 0` by hand to see why")
        yield endpoint.rstrip("/")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _first_line(process: subprocess.Popen, timeout: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout):
        raise CkptError("`ckpt serve` did not start in time", fix="check that loopback networking works")
    return process.stdout.readline()


class _Steps:
    """Times each step and feeds it to the report and the progress callback."""

    def __init__(self, report: DemoReport, progress: Callable[[DemoStep], None] | None) -> None:
        self.report, self.progress = report, progress

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict]:
        note = {"detail": "", "ok": True}
        started = time.perf_counter()
        yield note
        done = DemoStep(name, note["detail"], time.perf_counter() - started, note["ok"])
        self.report.steps.append(done)
        if self.progress:
            self.progress(done)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    logging.getLogger("open_clip").setLevel(logging.ERROR)


def _relative_paths(kwargs: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Absolute paths inside ``folder`` written as ``./...`` relative to it."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(folder):
            value = "./" + Path(value).relative_to(folder).as_posix()
        out[key] = value
    return out


@contextlib.contextmanager
def _loopback_allowed() -> Iterator[bool]:
    """With HF_HUB_OFFLINE set, huggingface_hub refuses every request, the demo's own mirror on
    127.0.0.1 included. The demo reaches nothing else, so it lifts the flag for its run and puts it
    back; yields whether it was set."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield was
    finally:
        constants.HF_HUB_OFFLINE = was


@contextlib.contextmanager
def _workdir(keep: str | Path | None) -> Iterator[Path]:
    """Where the demo works: ``keep`` itself when given (so every path the report prints is a file
    that stays), else a temporary folder removed afterwards."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="ckpt-demo-") as tmp:
            yield Path(tmp)
        return
    folder = Path(keep)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"--keep {keep}: {'not a folder' if not folder.is_dir() else 'the folder is not empty'}",
                         path=str(keep), fix="pass a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    yield folder.resolve()


def run_demo(*, preset: str = DEFAULT_PRESET, keep: str | Path | None = None, seed: int = 0,
             progress: Callable[[DemoStep], None] | None = None) -> DemoReport:
    """Build, publish, serve, validate (pin, remote diff, download, convert, load), generate."""
    _quiet_libraries()
    kit = _demo_kit(preset)
    report = DemoReport(preset)
    steps = _Steps(report, progress)
    with _workdir(keep) as work:
        with steps.step("make") as note:
            assets = kit.write_base_weights(work / "build")
            count = kit.write_checkpoint(assets, work / "build" / kit.filename, seed)
            note["detail"] = (f"tiny base weights (vision tower file, LM folder) and {kit.filename} with "
                              f"{count} trained tensors in the published layout")
        with steps.step("publish") as note:
            lm_files = {p.relative_to(assets["lm"]).as_posix(): p for p in sorted(assets["lm"].rglob("*")) if p.is_file()}
            lm_commit = publish(work / "hub", kit.lm_repo_id, lm_files)
            commit = publish(work / "hub", kit.repo_id, {kit.filename: work / "build" / kit.filename})
            note["detail"] = f"{kit.repo_id}@{commit[:7]} and {kit.lm_repo_id}@{lm_commit[:7]} in a local hub folder"
        cache = work / "cache"
        with served(work / "hub") as endpoint, _loopback_allowed() as lifted:
            lifted = " (HF_HUB_OFFLINE lifted for this mirror only)" if lifted else ""
            report.steps.append(DemoStep("serve", f"`ckpt serve` answering at {endpoint}{lifted}", 0.0))
            with steps.step("fetch LM") as note:
                lm = download(kit.lm_repo_id, revision="main", cache_dir=cache, endpoint=endpoint)
                note["detail"] = (f"{kit.lm_repo_id} pinned to {lm.commit[:7]}: {plural(len(lm.files), 'file')}, "
                                  "sha256-verified")
            config = work / "model.json"
            # paths relative to the config's folder, so a kept copy (--keep) still points at kept files
            kwargs = kit.factory_kwargs(assets, lm_commit=lm.commit, cache_dir=cache)
            config.write_text(json.dumps(_relative_paths(kwargs, work), indent=2))
            (work / "out").mkdir()
            with steps.step("validate") as note:
                result = validate(f"hf://{kit.repo_id}@main/{kit.filename}", model=preset, model_config=config,
                                  endpoint=endpoint, cache_dir=cache, lock=work / "checkpoint.lock",
                                  convert=work / "out" / "model.safetensors", load=True, device="cpu")
                report.validation = result
                note["ok"] = result.ok
                note["detail"] = result.verdict_line()
        if result.built is not None:
            with steps.step("generate") as note:
                model, image_processor, tokenizer = result.built
                report.generation = kit.generate(model, image_processor, tokenizer)
                note["detail"] = repr(report.generation)
        if keep:
            report.kept = str(keep)
            page = Path(keep) / "report.html"
            atomic_write(page, render_html("validate", result.to_dict(), command_line=f"ckpt demo --keep {keep}",
                                           tool_version=VERSION).encode("utf-8"))
            report.report_html = str(page)
    return report
