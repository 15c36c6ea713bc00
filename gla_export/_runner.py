"""Find and launch ``gla-run``, the C++ decode runner (runtimes/), from Python.

The package build installs the binary into ``gla_export/bin``; ``GLA_RUN_BINARY`` overrides the
search, and a CMake build tree under ``build/`` is looked at last (for developers). gla-run loads
ONNX Runtime at run time: :func:`run_gla_run` hands it the library of the installed
``onnxruntime`` package, and our custom-op library when it is built.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ._native import runs_here
from .errors import GlaExportError, MissingRuntimeError, ModelError, UsageError

BINARY = "gla-run"
_ERRORS = {2: UsageError, 3: ModelError, 5: MissingRuntimeError}


def _candidates() -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("GLA_RUN_BINARY")
    if env:
        out.append(Path(env))
    pkg = Path(__file__).resolve().parent
    out += [pkg / "bin" / BINARY, pkg / "lib" / BINARY]
    try:  # an installed wheel records where its files went (the tests run from a checkout)
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            for f in distribution("gla-export").files or []:
                if f.name == BINARY and f.parent.name in ("bin", "lib"):
                    out.append(Path(f.locate()))
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    root = pkg.parent
    for pattern in ("build/*/runtimes/" + BINARY, "build/runtimes/" + BINARY, "build/*/" + BINARY, "build/" + BINARY):
        found = [p for p in root.glob(pattern) if runs_here(p)]  # not build/arm64's cross builds
        out += sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    return out


def find_gla_run() -> Path | None:
    """Path of the gla-run binary, or None when it is not built."""
    if os.environ.get("GLA_RUN_BINARY"):
        p = Path(os.environ["GLA_RUN_BINARY"])
        return p if p.is_file() and os.access(p, os.X_OK) else None
    for p in _candidates():
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def gla_run_path() -> str:
    """Path of gla-run; :class:`MissingRuntimeError` (exit code 5) when it is not built."""
    p = find_gla_run()
    if p is None:
        where = (
            f"GLA_RUN_BINARY={os.environ['GLA_RUN_BINARY']} is not an executable file"
            if os.environ.get("GLA_RUN_BINARY")
            else "it is not built"
        )
        raise MissingRuntimeError(
            f"gla-run: {where}; reinstall gla-export with a C++ compiler and CMake available (pip install .), "
            "or build it: cmake -S runtimes -B build/runner && cmake --build build/runner -j2"
        )
    return str(p)


def onnxruntime_library() -> str | None:
    """libonnxruntime.so of the installed ``onnxruntime`` (or ``onnxruntime-gpu``) package."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    capi = Path(list(spec.submodule_search_locations)[0]) / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"), key=lambda p: len(p.name), reverse=True)
    return str(libs[0]) if libs else None


def cuda_library_dirs() -> list[str]:
    """Folders of the CUDA libraries that pip wheels ship (``site-packages/nvidia/*/lib``).

    ONNX Runtime's CUDA provider dlopens cuBLAS, cuDNN and the CUDA runtime by name; from Python,
    importing torch (or ``onnxruntime.preload_dlls()``) loads them, but the gla-run process is not
    Python, so they are put on its ``LD_LIBRARY_PATH`` instead.
    """
    import sys

    out: list[str] = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            out += [str(p) for p in sorted(base.glob("*/lib")) + sorted(base.glob("*/*/lib")) if p.is_dir()]
    return list(dict.fromkeys(out))


@dataclass
class RunResult:
    """What one gla-run invocation produced (its ``--format json`` line)."""

    ids: list[int]
    prompt_ids: list[int]
    stop: str
    prefill: bool
    backend: str
    state_bytes: int
    timing: dict[str, float]
    text: str | None = None
    # hybrids with full-attention layers: what their KV caches add per token, and the slots they
    # hold at the end (0 and 0 otherwise, and from a gla-run older than these fields)
    state_bytes_per_token: int = 0
    kv_positions: int = 0
    data: bytes | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""


def gla_run_command(
    export_dir: str | os.PathLike,
    ids: Sequence[int] | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 32,
    *,
    provider: str = "cpu",
    ignore_eos: bool = False,
    prefill: bool = True,
    threads: int | None = None,
    ort_lib: str | None = None,
    gla_lib: str | None = None,
    engine: str | os.PathLike | None = None,
    plugin: str | None = None,
    fmt: str = "json",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The gla-run command line for these arguments (libraries filled in from this environment)."""
    if (ids is None) == (prompt is None):
        raise UsageError("give exactly one of ids and prompt")
    cmd = [gla_run_path(), "--export", str(export_dir), "--max-new-tokens", str(int(max_new_tokens)), "--format", fmt]
    cmd += ["--prompt", prompt] if prompt is not None else ["--ids", ",".join(str(int(i)) for i in ids)]
    if provider != "cpu":
        cmd += ["--provider", provider]
    if ignore_eos:
        cmd.append("--ignore-eos")
    if not prefill:
        cmd.append("--no-prefill")
    if threads is not None:
        cmd += ["--threads", str(int(threads))]
    if engine is not None:
        cmd += ["--engine", str(engine)]
        if plugin is not None:
            cmd += ["--plugin", plugin]
    else:
        ort_lib = ort_lib or os.environ.get("GLA_RUN_ORT_LIB") or onnxruntime_library()
        if ort_lib is None:
            raise MissingRuntimeError("gla-run needs ONNX Runtime: pip install onnxruntime (or pass ort_lib)")
        cmd += ["--ort-lib", ort_lib]
        if gla_lib is None:
            from ._native import find_library

            found = find_library("ort")
            gla_lib = str(found) if found is not None else None
        if gla_lib is not None:
            cmd += ["--gla-lib", gla_lib]
    return cmd + list(extra_args)


def run_gla_run(
    export_dir: str | os.PathLike,
    ids: Sequence[int] | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 32,
    *,
    timeout: float | None = None,
    **kwargs: Any,
) -> RunResult:
    """Run gla-run once (greedy) and return its result; arguments as :func:`gla_run_command`.

    A failure raises the typed error of gla-run's exit status (UsageError, ModelError,
    MissingRuntimeError; GlaExportError otherwise) with gla-run's message.
    """
    cmd = gla_run_command(export_dir, ids, prompt, max_new_tokens, fmt="json", **kwargs)
    env = None
    if kwargs.get("provider", "cpu") == "cuda" or kwargs.get("engine") is not None:
        env = dict(os.environ)
        extra = cuda_library_dirs()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [*extra, *[p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]]
        )
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, check=False)
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        msg = next(
            (ln for ln in lines if ln.startswith("gla-run: error:")),
            lines[-1] if lines else f"exit status {proc.returncode}",
        )
        err = _ERRORS.get(proc.returncode, GlaExportError)(msg.removeprefix("gla-run: error: "))
        err.returncode = proc.returncode  # type: ignore[attr-defined]
        raise err
    out = json.loads(proc.stdout.decode("utf-8").strip().splitlines()[-1])
    data = bytes.fromhex(out["bytes_hex"]) if "bytes_hex" in out else None
    return RunResult(
        ids=out["ids"],
        prompt_ids=out["prompt_ids"],
        stop=out["stop"],
        prefill=out["prefill"],
        backend=out["backend"],
        state_bytes=out["state_bytes"],
        timing=out["timing"],
        text=out.get("text"),
        state_bytes_per_token=out.get("state_bytes_per_token", 0),
        kv_positions=out.get("kv_positions", 0),
        data=data,
        raw=out,
        stderr=stderr,
    )
