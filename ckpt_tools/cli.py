"""The ``ckpt`` command line: each command parses arguments, makes one library call, renders.

Heavy imports (torch, huggingface_hub, the library modules) happen inside the commands, so
``ckpt --help`` stays instant. Errors from the library become one line on stderr and exit code 2
(or the error's own ``exit_code``); ``CKPT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from .render import FORMATS

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def format_option(func):
    """``--format table|json|markdown`` shared by every command that prints a result."""
    return click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
        help="Output format: a table for people, json for scripts, markdown for PR comments.",
    )(func)


def remap_options(func):
    """The remap flags shared by remap, convert, diff, validate (applied in this order)."""
    options = [
        click.option("--strip-prefix", multiple=True, metavar="PREFIX",
                     help="Remove a leading prefix from keys (only at the start). Repeatable."),
        click.option("--add-prefix", multiple=True, metavar="PREFIX", help="Prepend a prefix to every key."),
        click.option("--rename", multiple=True, metavar="REGEX=REPL",
                     help="Regex rename, applied in order; each rule sees the previous rule's output."),
        click.option("--drop", multiple=True, metavar="GLOB", help="Drop keys matching a glob."),
        click.option("--keep", multiple=True, metavar="GLOB", help="Keep only keys matching a glob."),
        click.option("--preset", "remap_presets", multiple=True, metavar="NAME",
                     help="A named remap preset (ddp, compile, fsdp, ...)."),
        click.option("--rules", "rules_file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="A TOML rules file, applied after the flags."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def rules_from_options(kwargs: dict):
    """Pop the remap flags from a command's kwargs and build the rule list (None when empty)."""
    from .remap import rules_from_cli

    return rules_from_cli(
        strip_prefix=kwargs.pop("strip_prefix", ()), add_prefix=kwargs.pop("add_prefix", ()),
        rename=kwargs.pop("rename", ()), drop=kwargs.pop("drop", ()), keep=kwargs.pop("keep", ()),
        presets=kwargs.pop("remap_presets", ()), rules_file=kwargs.pop("rules_file", None),
    )


def emit(report, fmt: str) -> None:
    from .render import render

    render(report, fmt)


class CkptGroup(click.Group):
    """Maps library errors to one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
            from .errors import CkptError

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
    """Checkpoints as first-class objects: inspect, remap, convert, diff, validate, download.

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
@format_option
def inspect(source: str, pattern: str | None, depth: int, fmt: str) -> None:
    """Show keys, shapes, dtypes, params, bytes, aliases and extras without loading tensors.

    \b
    Example:
      ckpt inspect checkpoint.pt --depth 2
      ckpt inspect hf://openflamingo/OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt --format json
    """
    from .inspect import inspect_checkpoint

    emit(inspect_checkpoint(source, filter=pattern, depth=depth), fmt)


# --- remap ---
# --- convert ---
# --- diff ---
# --- validate ---
# --- download ---
# --- serve ---
# --- scan ---
# --- demo ---


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ckpt")


if __name__ == "__main__":
    main()
