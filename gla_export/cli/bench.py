"""``gla-export bench``: our runtimes side by side with PyTorch eager and fla (docs/verify-bench.md)."""

from __future__ import annotations

import click


def _ints(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--model",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="The checkpoint for the PyTorch contenders (default: the one the export recorded).",
)
@click.option(
    "--batch", "batches", default="1,16", show_default=True, callback=_ints, help="Batch sizes, comma-separated."
)
@click.option(
    "--prefill-len", type=click.IntRange(min=1), default=512, show_default=True, help="Prompt tokens per row."
)
@click.option("--decode-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Timed decode steps.")
@click.option(
    "--contexts",
    default="64,256,1024,4096,16384",
    show_default=True,
    callback=_ints,
    help="Context lengths for the memory and latency of the next token.",
)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed calls first.")
@click.option(
    "--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed prefill repeats (median)."
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads of ONNX Runtime and PyTorch.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(["ort-cpu", "ort-cuda", "ort-cuda-nograph", "trt", "gla-run", "eager", "recompute", "fla"]),
    help="Run only these contenders (repeatable).",
)
@click.option(
    "-o",
    "--out-dir",
    type=click.Path(file_okay=False, path_type=str),
    default=".",
    show_default=True,
    help="Where bench.json and bench.png go.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def bench(
    export_dir,
    model,
    batches,
    prefill_len,
    decode_tokens,
    contexts,
    warmup,
    repeats,
    threads,
    device,
    device_id,
    only,
    out_dir,
    quiet,
) -> None:
    """Benchmark EXPORT_DIR: prefill tokens/s, decode latency and tokens/s per batch size, and the
    memory and latency of the next token against the context length — ours (ONNX Runtime,
    TensorRT, gla-run) beside PyTorch eager and flash-linear-attention, in one run.

    Prints two tables and writes OUT_DIR/bench.json and OUT_DIR/bench.png.
    """
    from pathlib import Path

    from .._files import check_output_path
    from ..runtime.bench import KEYS, BenchSettings, write_json, write_plot
    from ..runtime.bench import bench as run_bench
    from . import console
    from .render import bench_tables

    err = console(stderr=True)
    settings = BenchSettings(
        batches=batches,
        prefill_len=prefill_len,
        decode_tokens=decode_tokens,
        contexts=contexts,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
    )
    check_output_path(Path(out_dir))  # before the runs, not after
    report = run_bench(
        export_dir,
        model=model,
        settings=settings,
        device=device,
        device_id=device_id,
        contenders=[KEYS[k] for k in only] or None,
        progress=None if quiet else (lambda msg: err.print(f"[dim]bench: {msg}[/dim]")),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "bench.json")
    write_plot(report, out / "bench.png")

    con = console()
    for table in bench_tables(report):
        con.print(table)
    for r in report.results:
        for note in r.notes:
            con.print(f"[dim]{r.name}: {note}[/dim]")
    for name, why in report.skipped.items():
        con.print(f"[yellow]skipped[/yellow] {name}: {why}")
    t = report.target
    if t.get("ratio") is not None:
        verdict = "[green]met[/green]" if t["met"] else "[red]not met[/red]"
        con.print(
            f"target: {t['metric']}: {t['ours']} {t['ours_tokens_per_s']:,.0f} vs {t['peer']} "
            f"{t['peer_tokens_per_s']:,.0f} = {t['ratio']:.2f}× (≥ {t['target_ratio']:g}×: {verdict})"
        )
    else:
        con.print(f"[dim]target ({t['metric']} ≥ {t['target_ratio']:g}× fla): not measured here: {t.get('why')}[/dim]")
    con.print(f"[green]wrote[/green] {out / 'bench.json'} and {out / 'bench.png'} ({report.seconds:.1f} s)")
