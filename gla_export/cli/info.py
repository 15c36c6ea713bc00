"""``gla-export info``: versions, devices and native libraries."""

from __future__ import annotations

import importlib
import json
import platform

import click


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return getattr(mod, "__version__", "unknown")


def collect_info() -> dict:
    from .. import __version__
    from .._native import LIBRARIES, find_library

    info: dict = {"gla_export": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "triton", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "polygraphy", "fla"):
        info[name] = _version(name)
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        info["cuda_available"] = False
        info["cuda_devices"] = []
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        info["onnxruntime_providers"] = []
    info["native_libraries"] = {kind: (str(p) if (p := find_library(kind)) else None) for kind in LIBRARIES}
    return info


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(as_json: bool) -> None:
    """Versions of the toolchain, CUDA availability and the native libraries built."""
    data = collect_info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.table import Table

    from . import console

    table = Table(title="gla-export info", show_header=False)
    for key, value in data.items():
        if key == "native_libraries":
            for kind, path in value.items():
                table.add_row(f"library {kind}", path or "[yellow]not built[/yellow]")
        else:
            table.add_row(key, "[dim]not installed[/dim]" if value is None else str(value))
    console().print(table)
