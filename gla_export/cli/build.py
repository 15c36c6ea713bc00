"""``gla-export build OUT_DIR``: TensorRT engines (prefill and T = 1 step) for an export directory."""

from __future__ import annotations

from pathlib import Path

import click

PRECISIONS = ("fp32", "fp16", "bf16")


def _positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Engine precision; default the export's dtype (a strongly typed network). "
                   "Lower than a float32 export needs the full TensorRT.")
@click.option("--max-batch", type=int, default=None, callback=_positive, help="Largest batch (default: the export's hint).")
@click.option("--max-seq", type=int, default=None, callback=_positive, help="Longest prefill (default: the export's hint).")
@click.option("--opt-batch", type=int, default=None, callback=_positive, help="Batch TensorRT tunes for.")
@click.option("--opt-seq", type=int, default=None, callback=_positive, help="Prefill length TensorRT tunes for.")
@click.option("--workspace", "workspace_mib", type=int, default=None, callback=_positive, help="Builder workspace limit in MiB.")
@click.option("--runtime", type=click.Choice(["auto", "tensorrt", "tensorrt_rtx"]), default="auto", show_default=True,
              help="Which TensorRT Python package builds the engines.")
@click.option("--plugin", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="libgla_tensorrt.so to load (default: the one built with gla-export).")
@click.option("-o", "--engines-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the engines go (default: OUT_DIR/tensorrt).")
@click.option("--force", is_flag=True, help="Replace existing engines.")
@click.option("--no-progress", is_flag=True, help="No progress display.")
def build(out_dir: Path, precision: str | None, max_batch: int | None, max_seq: int | None, opt_batch: int | None,
          opt_seq: int | None, workspace_mib: int | None, runtime: str, plugin: Path | None, engines_dir: Path | None,
          force: bool, no_progress: bool) -> None:
    """Build TensorRT engines for the export in OUT_DIR, with the gla-export plugin.

    Writes OUT_DIR/tensorrt/{prefill,step}.engine, engines.json (profiles, precision, versions)
    and build_engines.sh: the same builds as trtexec commands (--dynamicPlugins), for a Jetson
    where only trtexec is at hand. Engines only run on the GPU model and TensorRT version that
    built them.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ..runtime.tensorrt import build_engines
    from . import console

    err = console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                        disable=no_progress, transient=False)
    tasks: dict[str, int] = {}

    def on_event(event: dict) -> None:
        kind, job = event.get("event"), event.get("job")
        if kind == "loaded":
            creators = ", ".join(c[0] for c in event.get("creators", [])) or "no plugin"
            progress.console.print(f"[dim]{event.get('module')} {event.get('version')}; plugin creators: {creators}[/dim]")
        elif kind == "start":
            tasks[job] = progress.add_task(f"{job} engine: parsing and building", total=None)
        elif kind == "done" and job in tasks:
            size = event.get("bytes", 0) / 2**20
            progress.update(tasks[job], description=f"{job} engine: {size:.1f} MiB", total=1, completed=1)
        elif kind == "failed" and job in tasks:
            progress.update(tasks[job], description=f"[red]{job} engine: failed[/red]", total=1, completed=1)

    with progress:
        result = build_engines(
            out_dir,
            out_dir=engines_dir,
            precision=precision,
            max_batch=max_batch,
            max_seq=max_seq,
            opt_batch=opt_batch,
            opt_seq=opt_seq,
            workspace_mib=workspace_mib,
            runtime=None if runtime == "auto" else runtime,
            plugin=plugin,
            force=force,
            on_event=on_event,
        )

    info = result.info
    table = Table(title=f"TensorRT engines ({info['runtime']['module']} {info['runtime']['version']}, {info['precision']})")
    for col in ("engine", "file", "size", "build time", "profile (max)"):
        table.add_column(col)
    for graph, path in result.engines.items():
        e = info["engines"][graph]
        maxima = ", ".join(f"{n}={'x'.join(map(str, s[2]))}" for n, s in list(info["profiles"][graph].items())[:2])
        table.add_row(graph, str(path), f"{(e['bytes'] or 0) / 2**20:.1f} MiB", f"{e['seconds'] or 0:.1f} s", maxima)
    console().print(table)
    click.echo(f"trtexec commands for other devices: {result.script}")
