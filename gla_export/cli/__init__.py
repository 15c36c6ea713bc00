"""The ``gla-export`` command: a thin click shell over the library.

Subcommands live in their own modules and are imported only when run, so ``--help`` stays
fast. Errors print one line on stderr and exit with the code of their type
(gla_export.errors); ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..errors import GlaExportError

# gla_export.runtime.RUNTIMES, what --backend names; not imported from there so that --help stays fast
# (tests/cli checks that the two agree)
RUNTIMES = ("ort-cpu", "ort-cuda", "trt")

# name -> "module:attribute"; each module defines one click command
COMMANDS = {
    "bench": "gla_export.cli.bench:bench",
    "build": "gla_export.cli.build:build",
    "export": "gla_export.cli.export:export",
    "generate": "gla_export.cli.generate:generate",
    "info": "gla_export.cli.info:info",
    "serve": "gla_export.cli.serve:serve",
    "verify": "gla_export.cli.verify:verify",
}


def console(stderr: bool = False):
    """A rich console for tables: in a terminal as wide as the terminal; redirected to a file or a
    pipe (logs, CI) 160 columns unless COLUMNS says otherwise, not rich's 80, which cut the
    numbers of the verify and bench tables to "1.02e-…"."""
    import os

    from rich.console import Console

    c = Console(stderr=stderr)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c = Console(stderr=stderr, width=160)
    return c


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gla-export")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug output.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Export Gated Linear Attention language models to ONNX, ONNX Runtime and TensorRT."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


def main(argv: list[str] | None = None) -> None:
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="gla-export", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("gla-export: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except GlaExportError as e:
        if verbose:
            raise
        click.echo(f"gla-export: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("gla-export: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place that turns surprises into one line
        if verbose:
            raise
        click.echo(f"gla-export: internal error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)", err=True)
        sys.exit(1)
