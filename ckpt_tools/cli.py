"""The ``ckpt`` command line: each command parses arguments, makes one library call, renders.

The library modules import no heavy package at load time (torch, transformers, huggingface_hub and
rich are imported by the functions that need them), so ``ckpt --help`` stays instant. Errors from
the library become one line on stderr and exit code 2 (or the error's own ``exit_code``);
``CKPT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import sys
from pathlib import Path

import click

from . import demo as demo_module
from . import hub, server
from .convert_plan import DTYPE_CHOICES
from .diff import diff_keys
from .errors import CkptError, UsageError
from .fit import WRITERS, convert_fitting
from .fs import atomic_write, check_output_name
from .html import render_html
from .inspect import inspect_checkpoint
from .remap import rules_from_cli
from .remap_file import remap_checkpoint
from .render import FORMATS, plural, render
from .scan import scan_pickle
from .targets import TargetOptions, target_from_options
from .validation import validate as run_validate
from .version import VERSION

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
OUTPUT_KINDS = {"json": "JSON", "html": "HTML", "markdown": "markdown", "table": "text"}  # --output FILE's bytes
STDOUT_KEY, FORMAT_KEY, OUTPUT_KEY, ARGV_KEY = "ckpt.stdout", "ckpt.format", "ckpt.output", "ckpt.argv"


def _stash(name: str):
    """A click callback keeping an option's value in the context for ``emit``."""
    def callback(ctx, _param, value):
        ctx.meta[name] = value
        return value
    return callback


def format_option(func=None, *, html: bool = False):
    """``--format`` (table, json, markdown; html where the report has a page) and ``--output FILE``,
    shared by every command that prints a result. ``emit`` reads both, so commands take neither."""
    def decorate(func):
        choices = FORMATS + (("html",) if html else ())
        func = click.option("--output", type=click.Path(dir_okay=False), metavar="FILE", expose_value=False,
                            callback=_stash(OUTPUT_KEY),
                            help="Write the result to FILE (atomically) instead of stdout.")(func)
        return click.option(
            "--format", type=click.Choice(choices), default="table", show_default=True, expose_value=False,
            callback=_stash(FORMAT_KEY),
            help="Output format: a table for people, json for scripts, markdown for PR comments"
                 + (", html for a self-contained page." if html else "."),
        )(func)
    return decorate if func is None else decorate(func)


def remap_options(func):
    """The remap flags shared by remap, convert, diff, validate. Applied presets first (they undo
    training wrappers, so the other rules see clean names), then in the order listed here, then the
    rules file (see ``remap.rules_from_cli``)."""
    options = [
        click.option("--strip-prefix", multiple=True, metavar="PREFIX",
                     help="Remove a leading prefix from keys (only at the start). Repeatable."),
        click.option("--add-prefix", multiple=True, metavar="PREFIX", help="Prepend a prefix to every key."),
        click.option("--rename", multiple=True, metavar="REGEX=REPL",
                     help="Regex rename, applied in order; each rule sees the previous rule's output."),
        click.option("--drop", multiple=True, metavar="GLOB", help="Drop keys matching a glob."),
        click.option("--keep", multiple=True, metavar="GLOB", help="Keep only keys matching a glob."),
        click.option("--remap-preset", "remap_presets", multiple=True, metavar="NAME",
                     help="A named remap preset (ddp, compile, fsdp, ...); presets run before the other rules."),
        # the flag's first name, kept so existing scripts work; hidden beside --model PRESET
        click.option("--preset", "legacy_presets", multiple=True, metavar="NAME", hidden=True),
        click.option("--rules", "rules_file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="A TOML rules file, applied after the flags."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def reader_options(func):
    """``--select PATH`` and ``--inert``, shared by the commands that read a checkpoint's tensors or keys."""
    func = click.option("--inert", is_flag=True,
                        help="Read a pickle that names code-running globals without running anything (by "
                             "default such a file is refused; nothing is ever imported or called).")(func)
    return click.option("--select", metavar="PATH",
                        help="The state dict to take inside a training checkpoint, as a dotted path "
                             "(e.g. model_ema); by default it is chosen by content.")(func)


def write_inferred_rules(report, path: str) -> None:
    """The ``--write-rules FILE`` of diff: the inferred rules as a rules file, or a line saying why not."""
    check_output_name(path, "TOML")
    if report.inference is None:
        click.echo(f"no remap rule was inferred: {path} not written", err=True)
        return
    atomic_write(Path(path), report.inference.to_toml().encode("utf-8"))
    click.echo(f"wrote {plural(len(report.inference.rules), 'inferred rule')} to {path} (use them with --rules {path})",
               err=True)


def rules_from_options(kwargs: dict):
    """Pop the remap flags from a command's kwargs and build the rule list (None when empty)."""
    return rules_from_cli(
        strip_prefix=kwargs.pop("strip_prefix", ()), add_prefix=kwargs.pop("add_prefix", ()),
        rename=kwargs.pop("rename", ()), drop=kwargs.pop("drop", ()), keep=kwargs.pop("keep", ()),
        presets=kwargs.pop("remap_presets", ()) + kwargs.pop("legacy_presets", ()), rules_file=kwargs.pop("rules_file", None),
    )


def command_stdout():
    """The stdout a command's data goes to (see ``CkptGroup.invoke``)."""
    context = click.get_current_context(silent=True)
    return (context.meta.get(STDOUT_KEY) if context else None) or sys.stdout


def emit(report) -> None:
    """Render a report in the command's ``--format`` to stdout or ``--output FILE``; its warnings
    (``report.warnings``, where it has some) go to stderr, so stdout stays the data alone."""
    context = click.get_current_context()
    for warning in getattr(report, "warnings", ()):
        click.echo(f"warning: {warning}", err=True)
    fmt, output = context.meta.get(FORMAT_KEY, "table"), context.meta.get(OUTPUT_KEY)
    stream = io.StringIO() if output else command_stdout()
    if fmt == "html":
        stream.write(render_html(report.html_kind, report.to_dict(), command_line=shlex.join(
            context.meta.get(ARGV_KEY) or [context.command_path]), tool_version=VERSION))
    else:
        render(report, fmt, stream=stream)
    if output:
        atomic_write(Path(output), stream.getvalue().encode("utf-8"))
        click.echo(f"wrote {output}", err=True)


class CkptCommand(click.Command):
    """A command whose stdout carries its report only: whatever a library prints while the command
    runs (some print warnings to stdout when imported) goes to stderr; ``emit`` writes to the real
    stdout. Help and usage, printed while arguments are parsed, are not affected."""

    def invoke(self, ctx):
        ctx.meta[STDOUT_KEY] = sys.stdout
        _check_report_output(ctx)  # before the work: a bad --output must not come after a written result
        with contextlib.redirect_stdout(sys.stderr):
            return super().invoke(ctx)


def _check_report_output(ctx) -> None:
    """``--output FILE`` names a file of the ``--format``'s kind in a folder that exists."""
    output = ctx.meta.get(OUTPUT_KEY)
    if not output:
        return
    check_output_name(output, OUTPUT_KINDS[ctx.meta.get(FORMAT_KEY, "table")])
    if not Path(output).parent.is_dir():
        raise UsageError("the output's folder does not exist", path=output,
                         fix=f"create it first (mkdir -p {Path(output).parent})")


class CkptGroup(click.Group):
    """Maps library errors to one line and an exit code."""

    command_class = CkptCommand

    def make_context(self, info_name, args, *more, **kwargs):
        argv = [info_name or "ckpt", *args]  # before parsing consumes it: the command line an HTML report shows
        try:
            context = super().make_context(info_name, args, *more, **kwargs)
            context.meta[ARGV_KEY] = argv
            return context
        except KeyboardInterrupt:  # Ctrl-C while arguments are parsed: click alone would say "Aborted!", exit 1
            click.echo("interrupted", err=True)
            sys.exit(130)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
            if os.environ.get("CKPT_DEBUG") == "1" or isinstance(exc, click.exceptions.ClickException | click.exceptions.Exit | click.exceptions.Abort):
                raise
            if isinstance(exc, CkptError):
                click.echo(f"error: {exc.one_line()}", err=True)
                sys.exit(exc.exit_code)
            if isinstance(exc, OSError) and exc.errno is not None:
                name = f"{exc.filename}: " if exc.filename else ""
                click.echo(f"error: {name}{exc.strerror or exc}", err=True)
                sys.exit(EXIT_USAGE)
            raise


@click.group(cls=CkptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt-tools")
def cli() -> None:
    """Checkpoints as first-class objects: inspect, scan, remap, convert, diff, validate,
    download, serve, and an end-to-end demo.

    SOURCE is a local file or folder, or hf://ORG/NAME[@REVISION]/PATH.

    \b
    Example:
      ckpt inspect model.safetensors --format json
    """


# --- inspect ---
@cli.command()
@click.argument("source")
@click.option("--filter", "pattern", metavar="GLOB", help="Only keys matching this glob (e.g. 'perceiver.*').")
@click.option("--depth", type=click.IntRange(min=1), default=3, show_default=True,
              help="Module-prefix depth of the grouping (numbered layers count as part of their module).")
@click.option("--keys/--modules", "keys", default=None,
              help="One row per tensor (name, shape, dtype, bytes), or per module; by default per tensor when "
                   "there are at most 40.")
@click.option("--stats", "stats", is_flag=True,
              help="Also read the values, one tensor at a time: min, max, mean, std, NaN, Inf, zeros, per "
                   "tensor and per module.")
@reader_options
@format_option(html=True)
def inspect(source: str, pattern: str | None, depth: int, keys: bool | None, stats: bool, select: str | None,
            inert: bool) -> None:
    """Show keys, shapes, dtypes, params, bytes, aliases and extras without loading tensors.

    \b
    Example:
      ckpt inspect checkpoint.pt --depth 2
      ckpt inspect hf://openflamingo/OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt --format json
      ckpt inspect last.ckpt --select state_dict_ema --keys
      ckpt inspect model.safetensors --stats --format json
    """
    emit(inspect_checkpoint(source, filter=pattern, depth=depth, keys=keys, select=select, inert=inert,
                            stats=stats))


# --- remap ---
@cli.command()
@click.argument("src")
@click.argument("dst")
@remap_options
@click.option("--force", is_flag=True, help="Overwrite DST if it exists (never the source itself).")
@reader_options
@format_option
def remap(src: str, dst: str, force: bool, select: str | None, inert: bool, **kwargs) -> None:
    """Rewrite the keys of SRC into DST, keeping the format.

    safetensors stays safetensors (a sharded folder stays sharded); a torch pickle is written with
    torch.save, wrapper and extras kept. Presets run first, then --strip-prefix, --add-prefix,
    --rename, --drop, --keep, then the --rules file; each rule sees the previous rule's output.

    \b
    Example:
      ckpt remap train.pt clean.pt --remap-preset ddp --drop '*.num_batches_tracked'
      ckpt remap model.safetensors out.safetensors --rename '^transformer\\.=model.'
    """
    emit(remap_checkpoint(src, dst, rules=rules_from_options(kwargs), force=force, select=select, inert=inert))


# --- convert ---
@cli.command()
@click.argument("src")
@click.argument("dst")
@remap_options
@click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES), case_sensitive=False), default=None,
              help="Cast floating-point tensors (integer and bool tensors keep their dtype).")
@click.option("--max-shard-size", metavar="SIZE",
              help="Write DST as a folder of shards of at most SIZE (e.g. 2GB, 500MB) plus an index.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Reopen the output and compare every tensor bit for bit with its source.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs (never the source itself).")
@click.option("--extras", "extras_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the non-tensor entries (epoch, config...) that are JSON-able to FILE.")
@click.option("--to", "to", type=click.Choice(["safetensors", "dcp"]), default="safetensors", show_default=True,
              help="The output format: safetensors, or a torch.distributed.checkpoint folder (DST_DIR) that "
                   "torch's dcp.load reads into a sharded model.")
@click.option("--auto-remap", is_flag=True,
              help="Also apply the remap rules inferred against --model or --against (the result names them).")
@click.option("--model", "model", metavar="TARGET",
              help="With --auto-remap: the model the names must fit (any target `ckpt diff --model` takes).")
@click.option("--against", metavar="SOURCE2", help="With --auto-remap: a checkpoint whose names to fit.")
@reader_options
@format_option
def convert(src: str, dst: str, dtype: str | None, max_shard_size: str | None, verify: bool, force: bool,
            extras_path: str | None, to: str, auto_remap: bool, model: str | None, against: str | None,
            select: str | None, inert: bool, **kwargs) -> None:
    """Convert SRC (.pt, .bin, .safetensors, a sharded index, a DCP folder) to safetensors or DCP.

    DST is one .safetensors file, or with --max-shard-size (or when DST is a folder) shards named
    model-00001-of-0000N.safetensors plus model.safetensors.index.json. Tensors stream one at a
    time from a memory map (a DCP folder's tensors from their chunks); names that share one tensor
    are stored once and recorded in the metadata. With --to dcp, DST is a folder written by torch's
    own dcp.save (.metadata and __0_0.distcp), one tensor at a time. The output appears only once
    it is complete and verified.

    \b
    Example:
      ckpt convert checkpoint.pt model.safetensors --remap-preset ddp --extras extras.json
      ckpt convert pytorch_model.bin.index.json out/ --max-shard-size 2GB --dtype bf16
      ckpt convert full_state_dict.pt model.safetensors --auto-remap --model openflamingo-3b-vitl-mpt1b
      ckpt convert step-1000/ model.safetensors          # a DCP folder written by many ranks
      ckpt convert model.safetensors model-dcp/ --to dcp
    """
    options = {"rules": rules_from_options(kwargs), "dtype": dtype, "verify": verify, "force": force,
               "extras_path": extras_path, "select": select, "inert": inert}
    if to == "dcp" and max_shard_size is not None:
        raise UsageError("--max-shard-size splits safetensors output; a DCP folder is written as one .distcp file",
                         fix="drop --max-shard-size, or convert --to safetensors")
    if to == "safetensors":
        options["max_shard_size"] = max_shard_size
    if auto_remap and not (model or against):
        raise UsageError("--auto-remap fits the names to a model or a checkpoint, and none was given",
                         fix=f"add --model TARGET or --against SOURCE2, e.g. ckpt convert {src} {dst} --auto-remap "
                             "--model openflamingo-3b-vitl-mpt1b")
    if auto_remap:
        result = convert_fitting(src, dst, target_from_options(model, None, against), to=to, **options)
    elif model or against:
        raise UsageError("--model and --against only say what --auto-remap fits the names to",
                         fix="add --auto-remap, or drop --model/--against")
    else:
        result = WRITERS[to](src, dst, **options)
    emit(result)


# --- diff ---
MODEL_HELP = ("The model: a preset name, a transformers folder or config.json, hf://ORG/NAME[@REVISION] "
              "(only its config.json is read), timm:NAME, open_clip:NAME (architectures, no weights), or "
              "package.module:callable (a factory of yours: this runs your code).")


def _model_options(func):
    """--model-class / --trust-remote-code: how a transformers --model is built; shared by diff and validate."""
    func = click.option("--trust-remote-code", is_flag=True,
                        help="Let a transformers --model whose class lives in its repository's own code build "
                             "by running that code (only for repositories you trust; never implied).")(func)
    return click.option("--model-class", metavar="NAME",
                        help="The transformers class to build a config with (e.g. LlamaForCausalLM, "
                             "AutoModelForSequenceClassification); default: the config's architectures, "
                             "else the auto class for its task.")(func)


def _expect_options(func):
    """--expect-missing / --require, shared by diff and validate."""
    func = click.option("--require", multiple=True, metavar="GLOB",
                        help="Keys the checkpoint must cover even if frozen in the model. Repeatable.")(func)
    return click.option("--expect-missing", multiple=True, metavar="GLOB",
                        help="Model keys the checkpoint may omit (beyond frozen ones). Repeatable.")(func)


@cli.command()
@click.argument("source")
@click.option("--model", "model", metavar="TARGET", help=MODEL_HELP)
@click.option("--model-config", type=click.Path(dir_okay=False), metavar="FILE",
              help="Compare with the model a factory config (JSON/TOML keyword arguments) builds.")
@click.option("--against", metavar="SOURCE2", help="Compare with another checkpoint's keys.")
@_model_options
@remap_options
@_expect_options
@click.option("--auto-remap", is_flag=True,
              help="Apply the remap rules inferred when keys do not match (the report names them).")
@click.option("--write-rules", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the inferred remap rules to FILE (TOML), for --rules FILE in any command.")
@click.option("--values", is_flag=True,
              help="With --against: also compare the values of the tensors that match (max and mean |a-b|, "
                   "relative change, cosine, bitwise identical), read side by side.")
@click.option("--max-change", type=click.FloatRange(min=0), metavar="X",
              help="With --against: a relative change ||a-b||/||b|| above X is a problem (implies --values).")
@reader_options
@format_option(html=True)
def diff(source: str, model: str | None, model_config: str | None, against: str | None, model_class: str | None,
         trust_remote_code: bool, expect_missing: tuple[str, ...], require: tuple[str, ...], auto_remap: bool,
         write_rules: str | None, values: bool, max_change: float | None, select: str | None, inert: bool,
         **kwargs) -> None:
    """Key report of SOURCE against a model: matched, cast, shape mismatches, missing, unexpected.

    Missing keys are split into expected (frozen in the model, --expect-missing, the preset's
    expectations, what the model re-creates itself) and unexpected (trained parameters,
    --require). Exit 0 when the verdict is ok, 1 when it is not, 2 on bad input. Reads no tensor
    data; a preset's key listing is shipped data, and any other model's is cached after the first
    diff against it.

    \b
    Example:
      ckpt diff checkpoint.pt --model openflamingo-3b-vitl-mpt1b
      ckpt diff train.pt --model openflamingo-3b-vitl-mpt1b --strip-prefix module. --format json
      ckpt diff model.safetensors --model hf://meta-llama/Llama-2-7b-hf@main
      ckpt diff backbone.pt --model timm:resnet50 --strip-prefix backbone.
      ckpt diff new.safetensors --against old.safetensors --format markdown
      ckpt diff renamed.pt --model openflamingo-3b-vitl-mpt1b --write-rules fix.toml
      ckpt diff finetuned.safetensors --against base.safetensors --values --max-change 0.05
    """
    options = TargetOptions(model_class=model_class, trust_remote_code=trust_remote_code)
    report = diff_keys(source, target_from_options(model, model_config, against, options),
                       remap=rules_from_options(kwargs), expect_missing=expect_missing, require=require,
                       select=select, inert=inert, auto_remap=auto_remap, values=values, max_change=max_change)
    if write_rules:
        write_inferred_rules(report, write_rules)
    emit(report)
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


# --- validate ---
@cli.command()
@click.argument("source")
@click.option("--model", "model", metavar="TARGET", help=MODEL_HELP)
@click.option("--model-config", type=click.Path(dir_okay=False), metavar="FILE",
              help="A factory config (JSON/TOML keyword arguments) that builds the model; with --model, the "
                   "preset still supplies the expectations and checks.")
@_model_options
@remap_options
@_expect_options
@click.option("--revision", metavar="REV", help="For a hub source: branch, tag or commit (pinned before anything).")
@click.option("--endpoint", metavar="URL", help="Hub or mirror URL (default: HF_ENDPOINT).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Hub cache folder for the download.")
@click.option("--lock", "lock_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Record the pinned commit and the file's sha256 here.")
@click.option("--convert", "convert_to", type=click.Path(), metavar="DST",
              help="Also convert to a verified .safetensors at DST (and load from it).")
@click.option("--overwrite", is_flag=True, help="Let --convert replace an existing DST (as `ckpt convert --force`).")
@click.option("--load", "do_load", is_flag=True,
              help="Also load the checkpoint into the model and verify every tensor landed.")
@click.option("--force", is_flag=True, help="Go on past a failing key check (download, convert, load what fits).")
@click.option("--auto-remap", is_flag=True,
              help="Apply the remap rules inferred when keys do not match (diff, conversion and load).")
@click.option("--allow-nonfinite", is_flag=True, help="With --load: accept NaN or Inf in loaded tensors.")
@click.option("--allow-random", is_flag=True,
              help="With --load on a model built for real: accept parameters that stay randomly initialised.")
@click.option("--device", default="meta", show_default=True,
              help="Where to build the model; on meta only loaded tensors are materialised (on cpu).")
@reader_options
@format_option(html=True)
def validate(source: str, model: str | None, model_config: str | None, model_class: str | None,
             trust_remote_code: bool, expect_missing: tuple[str, ...],
             require: tuple[str, ...], revision: str | None, endpoint: str | None, cache_dir: str | None,
             lock_file: str | None, convert_to: str | None, overwrite: bool, do_load: bool, force: bool,
             auto_remap: bool, allow_nonfinite: bool, allow_random: bool, device: str, select: str | None,
             inert: bool, **kwargs) -> None:
    """Validate a checkpoint: pin, inspect, diff (remotely first), download, convert, load: one verdict.

    SOURCE is a local file or folder, hf://ORG/NAME[@REVISION]/PATH, or ORG/NAME with --revision
    (the preset names the file). A hub checkpoint is diffed before a byte of its weights is
    downloaded, then downloaded resumably and sha256-verified. Exit 0 when the verdict is ok, 1
    when it is not (or the load was refused), 2 on bad input.

    \b
    Example:
      ckpt validate hf://openflamingo/OpenFlamingo-9B-vitl-mpt7b@main/checkpoint.pt --model openflamingo-9b-vitl-mpt7b
      ckpt validate openflamingo/OpenFlamingo-3B-vitl-mpt1b --revision main --model openflamingo-3b-vitl-mpt1b --lock of3b.lock
      ckpt validate checkpoint.pt --model openflamingo-3b-vitl-mpt1b --convert model.safetensors --load
    """
    report = run_validate(source, model=model, model_config=model_config, remap=rules_from_options(kwargs),
                          expect_missing=expect_missing, require=require, load=do_load, force=force,
                          device=device, revision=revision, endpoint=endpoint, cache_dir=cache_dir,
                          lock=lock_file, convert=convert_to, overwrite=overwrite,
                          allow_random=allow_random, select=select, inert=inert, model_class=model_class,
                          trust_remote_code=trust_remote_code, auto_remap=auto_remap,
                          allow_nonfinite=allow_nonfinite)
    emit(report)
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


# --- download ---
@cli.command()
@click.argument("repo_id")
@click.argument("files", nargs=-1)
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit; resolved to one commit before any file.")
@click.option("--lock", "lock", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the commit and each file's size and sha256 here (or read them, with --locked).")
@click.option("--locked", is_flag=True, help="Fetch exactly what --lock FILE records; exit 1 if the bytes differ.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Hub cache folder (default: HF_HUB_CACHE).")
@click.option("--local-dir", type=click.Path(file_okay=False), help="Put plain files here instead of the cache.")
@click.option("--endpoint", metavar="URL", help="Hub or mirror URL (default: HF_ENDPOINT).")
@click.option("--dry-run", is_flag=True, help="Pin the commit and show what would be fetched (sizes, what is cached, "
                                               "ranges); write nothing.")
@click.option("--connections", default=hub.DEFAULT_CONNECTIONS, show_default=True, type=int, metavar="N",
              help="At most N connections at once, across all files; a big file is fetched in ranges over "
                   "up to N of them (1: one stream per file).")
@click.option("--chunk-size", default="64MiB", show_default=True, metavar="SIZE",
              help="Files above SIZE are fetched in ranges of about SIZE (e.g. 64MiB, 100MB; at least 64KiB).")
@format_option
def download(repo_id, files, revision, lock, locked, cache_dir, local_dir, endpoint, dry_run, connections,
             chunk_size):
    """Download files of REPO_ID at one pinned commit: resumable, hashed, verified.

    Without FILES, every file of the revision. A partial file survives an interrupted run and
    the next run resumes it; a big file is fetched in ranges over several connections, each range
    resumable, and hashed while it downloads.

    \b
    Example:
      ckpt download openflamingo/OpenFlamingo-3B-vitl-mpt1b checkpoint.pt --lock ckpt.lock
      ckpt download openflamingo/OpenFlamingo-3B-vitl-mpt1b --lock ckpt.lock --locked
      ckpt download openflamingo/OpenFlamingo-3B-vitl-mpt1b --dry-run
    """
    plan = hub.plan_download(repo_id, files, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
                             endpoint=endpoint, lock=lock, locked=locked, connections=connections,
                             chunk_size=chunk_size)
    emit(plan if dry_run else hub.execute(plan))


# --- serve ---
@cli.command()
@click.argument("folder", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0 picks a free one).")
@click.option("--rate-limit", metavar="RATE",
              help="Cap each connection's throughput, e.g. 20MB/s: a link where one stream is the bottleneck.")
def serve(folder, host, port, rate_limit):
    """Serve DIR, a hub cache folder (models--ORG--NAME/...), as a local hub mirror.

    huggingface_hub, transformers and `ckpt download` use it with HF_ENDPOINT.

    \b
    Example:
      ckpt serve ~/.cache/huggingface/hub --port 8080
      HF_ENDPOINT=http://127.0.0.1:8080 ckpt download openflamingo/OpenFlamingo-3B-vitl-mpt1b
      ckpt serve ~/.cache/huggingface/hub --port 0 --rate-limit 20MB/s
    """
    server.serve(folder, host, port, out=command_stdout(), rate_limit=rate_limit)


# --- scan ---
@cli.command()
@click.argument("source")
@format_option
def scan(source: str) -> None:
    """List what a pickle checkpoint would import and call, without running it.

    Walks the opcodes of every pickle in SOURCE (a torch zip file, a legacy torch file, a plain
    pickle, or a folder or *.index.json of them; local or hf://) and checks each global against
    the allow-list of torch.load(weights_only=True). Exit 0 when safe, 1 when unsafe, 2 when
    unreadable.

    \b
    Example:
      ckpt scan checkpoint.pt
      ckpt scan hf://openflamingo/OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt --format json
    """
    report = scan_pickle(source)
    emit(report)
    sys.exit(EXIT_OK if report.verdict == "safe" else EXIT_PROBLEMS)
# --- demo ---
@cli.command()
@click.option("--keep", type=click.Path(file_okay=False), metavar="DIR",
              help="Work in DIR (new or empty) and keep the demo's files there (hub folder, cache, converted "
                   "model, report.html) instead of a temporary folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the demo checkpoint's values.")
@format_option
def demo(keep: str | None, seed: int) -> None:
    """Run the main job end to end, offline, on a tiny OpenFlamingo checkpoint.

    Makes a tiny checkpoint in the published layout, serves it with `ckpt serve` on a free loopback
    port, then validates it as you would a real one: pin the revision, diff it remotely, download
    it verified, convert it to safetensors, load it into the model with verification and
    provenance, and generate a few tokens. Cleans up after itself.

    \b
    Example:
      ckpt demo
      ckpt demo --format json --keep /tmp/ckpt-demo
    """
    def progress(step) -> None:
        click.echo(f"[{step.name}] {'ok' if step.ok else 'FAIL'} ({step.seconds:.1f}s) {step.detail}", err=True)

    report = demo_module.run_demo(keep=keep, seed=seed, progress=progress)
    emit(report)
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEMS)




def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="ckpt", standalone_mode=False)
    except click.UsageError as exc:  # a bad option or argument: one line, like every other error
        if type(exc).__name__ == "NoArgsIsHelpError":  # `ckpt` alone: the help is the answer
            click.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        where = exc.ctx.command_path if exc.ctx is not None else "ckpt"
        click.echo(f"error: {exc.format_message().rstrip('.')}; fix: see `{where} --help`", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    if isinstance(code, int):  # ctx.exit(N) returns N when click does not exit itself
        sys.exit(code)


if __name__ == "__main__":
    main()
