"""How the commands show the library's results: rich tables of the verify, bench and
validation reports, and the export's progress display. The library returns data (reports,
progress events); only this module and the command modules draw (as Polygraphy's tools sit on
its backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..export.api import ProgressEvent
    from ..export.validate import ValidationReport
    from ..runtime.bench import BenchReport
    from ..runtime.verify import VerifyReport


def _ok(passed: bool) -> str:
    return "[green]ok[/green]" if passed else "[red]FAIL[/red]"


def verify_table(report: VerifyReport):
    """One row per case, backend and output kind (the worst layer stands for all)."""
    from rich.table import Table

    rule = (
        f"|err| <= {report.atol:g} + {report.rtol:g}·max|ref| per output"
        if report.check_error_stat == "scaled"
        else f"{report.check_error_stat} error within atol {report.atol:g} or rtol {report.rtol:g}"
    )
    t = Table(title=f"PyTorch vs runtimes, {report.dtype} (pass: {rule}; state = worst layer)")
    for col, just in (
        ("case", "left"),
        ("backend", "left"),
        ("output", "left"),
        ("iters", "right"),
        ("max|err|", "right"),
        ("atol", "right"),
        ("max rel", "right"),
        ("mean|err|", "right"),
        ("", "left"),
    ):
        t.add_column(col, justify=just, no_wrap=True)
    short = {"recurrent_state": "state", "conv_state": "conv state"}
    for r in report.rows:
        t.add_row(
            r.case,
            r.backend,
            short.get(r.output, r.output),
            str(r.iterations),
            f"{r.max_abs:.2e}",
            f"{r.limit:.2e}",
            f"{r.max_rel:.2e}",
            f"{r.mean_abs:.2e}",
            _ok(r.passed),
        )
    return t


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def bench_tables(report: BenchReport):
    """Throughput and latency per batch; memory and latency of the next token per context."""
    from rich.table import Table

    batches = report.settings["batches"]
    weights = report.model.get("weights", "fp")
    what = report.model["dtype"] + ("" if weights == "fp" else f", weights {weights}")
    speed = Table(title=f"throughput and latency ({report.device['name']}, {what})")
    speed.add_column("contender", no_wrap=True)
    for b in batches:
        speed.add_column(f"prefill tok/s B{b}", justify="right")
    for b in batches:
        speed.add_column(f"decode ms/tok B{b}", justify="right")
        speed.add_column(f"decode tok/s B{b}", justify="right")
        speed.add_column(f"÷ floor B{b}", justify="right")
    for r in report.results:
        if not r.prefill and not r.decode:
            continue
        cells = [_fmt(r.prefill.get(b, {}).get("tokens_per_s"), "{:,.0f}") for b in batches]
        for b in batches:
            d = r.decode.get(b, {})
            cells += [_fmt(d.get("ms_per_token"), "{:.3f}"), _fmt(d.get("tokens_per_s"), "{:,.0f}"),
                      _fmt(d.get("ratio_to_floor"), "{:.2f}×")]
        speed.add_row(r.name, *cells)
    floor = report.floor.get("ms_per_token") or {}
    if floor:
        bw = report.copy_bandwidth
        cells = ["-"] * len(batches)
        for b in batches:
            cells += [_fmt(floor.get(b), "{:.3f}"), _fmt(1e3 * b / floor[b] if floor.get(b) else None, "{:,.0f}"), "1×"]
        speed.add_row(f"floor (copy {bw['bytes_per_s'] / 1e9:,.0f} GB/s, {bw['way']})", *cells)
        per_step = report.floor.get("step_bytes") or {}
        speed.caption = (
            f"weights resident {_mib(report.floor.get('weights_resident_bytes'))} (as stored, each tensor once); "
            "read per decode step: " + ", ".join(f"B{b} {_mib(per_step.get(b))}" for b in batches)
            + " (weights a step reads + 2 × state per row); floor = that ÷ copy bandwidth"
        )

    contexts = report.settings["contexts"]
    mem = Table(title="next token at context L: memory beyond the weights (MiB) / latency (ms)")
    mem.add_column("contender", no_wrap=True)
    for L in contexts:
        mem.add_column(f"L={L}", justify="right")
    for r in report.results:
        if not r.context:
            continue
        cells = []
        for L in contexts:
            c = r.context.get(L)
            cells.append("-" if c is None else f"{c['bytes'] / 2**20:.2f} / {c['ms_per_token']:.2f}")
        mem.add_row(r.name, *cells)
    return speed, mem


def validation_table(report: ValidationReport, title: str | None = None):
    """The export's own validation: one row per case and output kind (the worst layer)."""
    from rich.table import Table

    t = Table(title=title or f"validation (pass: max|err| <= {report.atol:g} + {report.rtol:g}·max|ref|)")
    for col, just in (("case", "left"), ("output (worst layer)", "left"), ("max |err|", "right"), ("limit", "right"),
                      ("rel. norm err", "right"), ("", "left")):
        t.add_column(col, justify=just)
    for c in report.summary_rows():
        parts = c.output.split(".")
        output = f"{parts[2]} (layer {parts[1]})" if c.output.startswith("present.") and len(parts) == 3 else c.output
        t.add_row(c.case, output, f"{c.max_abs:.2e}", f"{c.limit:.2e}", f"{c.rel:.2e}", _ok(c.ok))
    return t


class StepProgress:
    """A rich progress display fed :class:`~gla_export.export.api.ProgressEvent` (the export's
    ``progress`` callback): one line per step, a bar for steps with a total. Use as a context."""

    def __init__(self, console: Any = None, enabled: bool = True):
        self._progress = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                TimeElapsedColumn(), console=console or Console(stderr=True), transient=False,
            )

    def __enter__(self) -> StepProgress:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress:
            self._progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        if not self._progress:
            return
        task = self._tasks.get(event.step)
        if task is None:
            task = self._tasks[event.step] = self._progress.add_task(event.step, total=event.total)
        if event.done:
            self._progress.update(task, total=event.total or 1, completed=event.total or 1)
        else:
            self._progress.update(task, completed=event.completed)
