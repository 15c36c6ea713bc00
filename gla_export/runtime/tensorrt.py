"""TensorRT engines for exported GLA models, built with our plugin (``libgla_tensorrt``).

:func:`build_engines` turns an export directory (``gla-export export``) into a prefill engine
(optimisation profile from the batch and sequence ranges) and a T = 1 step engine, and writes
the equivalent ``trtexec`` commands beside them for devices where only trtexec is at hand.
The ``tensorrt`` Python package is used when installed, else ``tensorrt_rtx``.

TensorRT runs in a child process (:func:`run_jobs`), never in the caller's:

- TensorRT-RTX's ONNX parser aborts the whole process on a plugin node unless its library is
  reachable under the unversioned name ``libtensorrt_rtx.so``, which the wheel does not ship;
  the child gets an ``LD_LIBRARY_PATH`` with that symlink (:func:`child_env`), and if anything
  else aborts, the caller reports it instead of dying.
- The child reports progress as JSON lines, which the CLI turns into a progress display.

The worker (``tensorrt_worker.py``, which the child loads by file path) imports only the standard
library and TensorRT, so the child starts fast and without torch; a test checks that rule.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..export.metadata import ExportMetadata

from .tensorrt_worker import EVENT_PREFIX, PLUGIN_OPS, PluginLoadError, load_plugin  # noqa: F401 - re-exported

MODULES = ("tensorrt", "tensorrt_rtx")
PRECISIONS = ("fp32", "fp16", "bf16")
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ENGINES_DIR = "tensorrt"
ENGINE_FILES = {"prefill": "prefill.engine", "step": "step.engine"}
SCRIPT_FILE = "build_engines.sh"
INFO_FILE = "engines.json"
INSTALL_HINT = (
    "install TensorRT's Python package: `pip install tensorrt` (NVIDIA TensorRT 10.x) or "
    "`pip install tensorrt-rtx-cu13` (TensorRT-RTX), or use JetPack's python3-libnvinfer on a Jetson"
)


# ---- finding TensorRT and the plugin --------------------------------------------------------------


def available_module(prefer: str | None = None) -> str | None:
    """The TensorRT Python module to use: ``prefer`` if given and installed, else ``tensorrt``, else
    ``tensorrt_rtx``; None when neither is installed."""
    import importlib.util

    if prefer is not None and prefer not in MODULES:
        raise ValueError(f"runtime must be one of {', '.join(MODULES)}, got {prefer!r}")
    for name in (prefer,) if prefer else MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        # a folder of that name on sys.path (a test folder, say) is a namespace package, not TensorRT
        if spec is not None and spec.origin not in (None, "namespace"):
            return name
    return None


def require_module(prefer: str | None = None) -> str:
    """Like :func:`available_module`, but raises MissingRuntimeError (exit code 5) with one line
    saying what to install."""
    from ..errors import MissingRuntimeError

    name = available_module(prefer)
    if name is None:
        wanted = f"the `{prefer}` Python package is not installed" if prefer else "TensorRT is not installed"
        raise MissingRuntimeError(f"{wanted}: {INSTALL_HINT}")
    return name


def plugin_library(path: str | os.PathLike | None = None) -> str:
    """Path of libgla_tensorrt.so (``path`` if given); MissingRuntimeError when it is not there."""
    from ..errors import MissingRuntimeError

    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MissingRuntimeError(f"the TensorRT plugin library {p} does not exist")
        return str(p.resolve())
    from .._native import NativeLibraryError, library_path

    try:
        return library_path("trt")
    except NativeLibraryError as e:
        raise MissingRuntimeError(
            f"{e} (the TensorRT plugin needs nvcc and the TensorRT headers at build time; see docs/tensorrt.md)"
        ) from e


_SHIM_DIRS: dict[str, str] = {}


def _libs_dir(module: str) -> Path | None:
    """Folder of the shared libraries that a pip-installed TensorRT wheel ships."""
    import importlib.util

    for name in (f"{module}_libs",):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
    return None


def child_env(module: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a process that runs TensorRT's ONNX parser on plugin nodes.

    The pip wheels ship only versioned libraries (``libtensorrt_rtx.so.1``) while the parser
    dlopens the unversioned name for plugins (and aborts the process when that fails). When no
    unversioned name sits beside a versioned one or on LD_LIBRARY_PATH, a private folder of
    symlinks (removed at exit) is put first on LD_LIBRARY_PATH.
    """
    env = dict(os.environ if base is None else base)
    libs = _libs_dir(module)
    if libs is None or not libs.is_dir():
        return env
    search = [Path(p) for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    missing = []
    for lib in sorted(libs.glob("lib*.so.*")):
        unversioned = lib.name.split(".so.")[0] + ".so"
        if not any((d / unversioned).exists() for d in [libs, *search]):
            missing.append((unversioned, lib))
    if not missing:
        return env
    key = str(libs)
    shim = _SHIM_DIRS.get(key)
    if shim is None or not Path(shim).is_dir():
        shim = tempfile.mkdtemp(prefix="gla-trt-libs-")
        atexit.register(shutil.rmtree, shim, True)
        _SHIM_DIRS[key] = shim
    for unversioned, lib in missing:
        link = Path(shim) / unversioned
        if not link.exists():
            link.symlink_to(lib)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([shim, *map(str, search)])
    return env


# ---- running TensorRT in a child process ---------------------------------------------------------


class WorkerError(RuntimeError):
    """The TensorRT child process died or could not start (not a failed job: those are results)."""


@dataclass
class JobResult:
    name: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        return None if self.ok else self.data.get("error", "unknown error")


def run_jobs(
    jobs: list[dict[str, Any]],
    *,
    module: str | None = None,
    plugins: list[str] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> tuple[dict[str, Any], list[JobResult]]:
    """Run TensorRT jobs in a child process; returns ``(load_info, results)``.

    A job is a dict with ``name``, ``kind`` (``build``: parse an ONNX file and build a serialized
    plan; ``parse``: parse only) and, for ``build``/``parse``: ``onnx`` (path), ``profiles`` (a
    list of ``{input: [min, opt, max]}``), ``output`` (plan path, build only; written atomically),
    ``strongly_typed`` (bool), ``flags`` (BuilderFlag names, e.g. ``["FP16"]``) and
    ``workspace_bytes`` (optional). ``load_info`` tells which TensorRT ran and what the plugin
    libraries registered. A job that fails is a result with ``ok=False`` and the error and
    TensorRT's messages; a child that dies raises :class:`WorkerError`.
    """
    module = module or require_module()
    # the op contract on the GLA nodes' attributes first: TensorRT's parser narrows int attributes
    # to int32 before the plugin sees them (a q_num_heads of 2^32+4 would build as 4)
    from ..ops.contract import ContractError, check_onnx_file

    refused: dict[str, JobResult] = {}
    for job in jobs:
        if "onnx" in job:
            try:
                check_onnx_file(job["onnx"], tensorrt=True)
            except ContractError as e:
                refused[job["name"]] = JobResult(job["name"], False, {"error": f"{job['onnx']}: {e}"})
    all_jobs, jobs = jobs, [j for j in jobs if j["name"] not in refused]
    request = {"module": module, "plugins": [str(p) for p in plugins or []], "jobs": jobs}
    worker = Path(__file__).resolve().with_name("tensorrt_worker.py")
    bootstrap = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gla_trt_worker', {str(worker)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)\n"
        "sys.exit(mod.worker_main())\n"
    )
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", bootstrap],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(module),
            text=True,
        )
    except OSError as e:
        raise WorkerError(f"cannot start the TensorRT worker: {e}") from e
    stderr_tail: deque[str] = deque(maxlen=40)
    drain = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(request))
    proc.stdin.close()

    info: dict[str, Any] = {}
    results: dict[str, JobResult] = {}
    finished = False
    deadline = None if timeout is None else time.monotonic() + timeout
    stray: deque[str] = deque(maxlen=20)
    for line in proc.stdout:
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            raise WorkerError(f"TensorRT did not finish within {timeout:.0f} s")
        if not line.startswith(EVENT_PREFIX):
            stray.append(line.rstrip())
            continue
        event = json.loads(line[len(EVENT_PREFIX):])
        kind = event.get("event")
        if kind == "loaded":
            info = event
        elif kind == "done":
            results[event["job"]] = JobResult(event["job"], True, event)
        elif kind == "failed":
            results[event["job"]] = JobResult(event["job"], False, event)
        elif kind == "fatal":
            info = {**info, **event}
        elif kind == "finished":
            finished = True
        if on_event is not None:
            on_event(event)
    rc = proc.wait()
    drain.join(timeout=5)
    if "error" in info and info.get("event") == "fatal":
        raise WorkerError(info["error"])
    if rc != 0 or not finished:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        tail = "\n".join(list(stderr_tail)[-12:] + list(stray)[-5:]).strip()
        running = next((e for e in jobs if e["name"] not in results), None)
        during = f" while running job {running['name']!r}" if running else ""
        raise WorkerError(f"the TensorRT process {how}{during}" + (f":\n{tail}" if tail else ""))
    results.update(refused)
    return info, [results.get(j["name"], JobResult(j["name"], False, {"error": "no result"})) for j in all_jobs]


# ---- engines for an export directory -------------------------------------------------------------


@dataclass
class EngineResult:
    """What :func:`build_engines` wrote."""

    out_dir: Path
    engines: dict[str, Path]
    script: Path
    info: dict[str, Any]


def _ranges(meta: ExportMetadata, max_batch: int | None, max_seq: int | None, opt_batch: int | None,
            opt_seq: int | None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic dimension: the export's shape hints, overridden."""
    from ..errors import UsageError

    hints = meta.shape_hints or {}
    batch = dict(hints.get("batch") or {"min": 1, "opt": 1, "max": 8})
    seq = dict(hints.get("sequence") or {"min": 1, "opt": 128, "max": 2048})
    if max_batch is not None:
        batch["max"] = max_batch
        batch["opt"] = min(batch.get("opt", 1), max_batch)
    if max_seq is not None:
        seq["max"] = max_seq
        seq["opt"] = min(seq.get("opt", 1), max_seq)
    if opt_batch is not None:
        batch["opt"] = opt_batch
    if opt_seq is not None:
        seq["opt"] = opt_seq
    out = {}
    for name, r in (("batch", batch), ("sequence", seq)):
        lo, opt, hi = int(r.get("min", 1)), int(r["opt"]), int(r["max"])
        if not 1 <= lo <= opt <= hi:
            raise UsageError(f"{name} range must satisfy 1 <= min <= opt <= max, got min={lo} opt={opt} max={hi}")
        out[name] = (lo, opt, hi)
    # hybrids: a full-attention layer's KV cache, empty at the start of a context
    out["past_sequence"] = (0, out["sequence"][1], out["sequence"][2])
    return out


def graph_profile(meta: ExportMetadata, graph: str, ranges: dict[str, tuple[int, int, int]]) -> dict[str, list]:
    """``{input: [min, opt, max]}`` for one graph: symbolic dimensions take their range, a fixed
    one (the step's T = 1, the state's head sizes) stays as it is."""
    from ..errors import UsageError

    profile = {}
    for io in meta.graphs[graph].inputs:
        shapes: list[list[int]] = [[], [], []]
        for dim in io.shape:
            if isinstance(dim, int) and dim >= 0:
                for s in shapes:
                    s.append(dim)
            elif isinstance(dim, str) and dim in ranges:
                for s, v in zip(shapes, ranges[dim]):
                    s.append(v)
            else:
                raise UsageError(f"{graph} input {io.name} has dimension {dim!r}, which has no range (known: {', '.join(ranges)})")
        profile[io.name] = shapes
    return profile


def precision_plan(meta: ExportMetadata, precision: str | None, module: str) -> tuple[str, bool, list[str]]:
    """(precision, strongly_typed, builder flags).

    The export's own dtype builds a strongly typed network: every tensor keeps the type the
    graph gives it (the GLA state stays float32 under float16 activations). A lower precision
    than the graph's float32 uses the weakly typed builder flags, which only the full TensorRT
    has; TensorRT-RTX builds strongly typed networks only.
    """
    from ..errors import UsageError

    graph_dtype = meta.dtype
    names = {v: k for k, v in PRECISION_DTYPES.items()}
    native = names.get(graph_dtype, "fp32")
    precision = precision or native
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == native:
        return precision, True, []
    if graph_dtype != "float32":
        raise UsageError(
            f"this export is {graph_dtype}; it builds at {native} only (re-export with `gla-export export --dtype {precision}`)"
        )
    if module == "tensorrt_rtx":
        raise UsageError(
            f"TensorRT-RTX builds strongly typed networks only, so a float32 export runs in float32: re-export with "
            f"`gla-export export --dtype {precision}`, or build with the full TensorRT (`pip install tensorrt`)"
        )
    return precision, False, [precision.upper()]


def _shape_arg(profile: dict[str, list], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def trtexec_script(meta: ExportMetadata, profiles: dict[str, dict[str, list]], strongly_typed: bool, flags: list[str],
                   workspace_mib: int | None, plugin: bool = True) -> str:
    """A POSIX shell script that rebuilds the engines with trtexec (for a Jetson with JetPack)."""
    lines = [
        "#!/bin/sh",
        "# Rebuild the TensorRT engines of this export with trtexec, e.g. on a Jetson where JetPack ships",
        "# trtexec (/usr/src/tensorrt/bin/trtexec) but no TensorRT Python package. Engines are specific to",
        "# the GPU and the TensorRT version: build them on the device that runs them.",
        "#   GLA_TRT_PLUGIN  libgla_tensorrt.so built for this device (see docs/tensorrt.md)",
        "#   TRTEXEC         the trtexec binary (default: trtexec on PATH, then JetPack's)",
        "set -eu",
        'HERE=$(cd "$(dirname "$0")" && pwd)',
        'EXPORT=$(dirname "$HERE")',
        'PLUGIN=${GLA_TRT_PLUGIN:-$HERE/libgla_tensorrt.so}',
        'if [ -z "${TRTEXEC:-}" ]; then',
        "  if command -v trtexec >/dev/null 2>&1; then TRTEXEC=trtexec; else TRTEXEC=/usr/src/tensorrt/bin/trtexec; fi",
        "fi",
    ]
    if plugin:
        lines.append('[ -f "$PLUGIN" ] || { echo "build_engines.sh: no plugin library at $PLUGIN (set GLA_TRT_PLUGIN)" >&2; exit 1; }')
    lines.append("")
    typing = ["--stronglyTyped"] if strongly_typed else [f"--{f.lower()}" for f in flags]
    for graph in ("prefill", "step"):
        args = [
            '"$TRTEXEC"',
            f'--onnx="$EXPORT/{meta.path(graph).name}"',
            *(['--dynamicPlugins="$PLUGIN"'] if plugin else []),
            f'--saveEngine="$HERE/{ENGINE_FILES[graph]}"',
            f"--minShapes={_shape_arg(profiles[graph], 0)}",
            f"--optShapes={_shape_arg(profiles[graph], 1)}",
            f"--maxShapes={_shape_arg(profiles[graph], 2)}",
            *typing,
            "--skipInference",
        ]
        if workspace_mib:
            args.append(f"--memPoolSize=workspace:{workspace_mib}M")
        lines.append(f"echo 'building {graph} engine'")
        lines.append(" \\\n    ".join(args))
        lines.append("")
    return "\n".join(lines)


def _is_engines_dir(path: Path) -> bool:
    try:
        return json.loads((path / INFO_FILE).read_text())["producer"]["name"] == "gla-export"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_engines_dir(path: Path, force: bool, export_dir: Path) -> None:
    """``path`` is new, empty, or (with ``force``) engines we built; never the export or above it."""
    from .._files import check_output_dir

    check_output_dir(path, force=force, ours=_is_engines_dir, what=f"a gla-export engines directory (no {INFO_FILE} of gla-export)",
                     inputs=[export_dir])


def build_engines(
    export_dir: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    precision: str | None = None,
    max_batch: int | None = None,
    max_seq: int | None = None,
    opt_batch: int | None = None,
    opt_seq: int | None = None,
    workspace_mib: int | None = None,
    runtime: str | None = None,
    plugin: str | os.PathLike | None = None,
    force: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> EngineResult:
    """Build the prefill and step engines of an export (see the module docstring).

    Args:
        export_dir: written by ``gla-export export`` (metadata.json, prefill.onnx, step.onnx).
        out_dir: where the engines go; default ``<export_dir>/tensorrt``. Written atomically:
            built in a temporary folder beside it and renamed into place.
        precision: ``fp32``/``fp16``/``bf16``; default the export's dtype (see :func:`precision_plan`).
        max_batch, max_seq, opt_batch, opt_seq: the optimisation profile; default the export's
            shape hints. The step engine has T = 1.
        runtime: ``tensorrt`` or ``tensorrt_rtx``; default whichever is installed (``tensorrt`` first).
        plugin: libgla_tensorrt.so; default the one built with the package.

    Raises:
        MissingRuntimeError (no TensorRT, no plugin), UsageError, OutputExistsError,
        ExportFailedError (TensorRT could not build an engine).
    """
    from .. import __version__
    from .._files import discard_staging, staging_dir
    from ..errors import ExportFailedError
    from ..export.metadata import open_export

    export_dir = Path(export_dir)
    meta = open_export(export_dir)
    if meta.attention_op == "gqa":
        from ..errors import UsageError

        raise UsageError("this export's attention layers are com.microsoft::GroupQueryAttention, an ONNX Runtime op "
                         "that TensorRT has no layer for: export with --attention-op decomposed to build engines")
    final = Path(out_dir) if out_dir is not None else export_dir / ENGINES_DIR
    _check_engines_dir(final, force, export_dir)
    module = require_module(runtime)
    precision, strongly_typed, flags = precision_plan(meta, precision, module)
    ranges = _ranges(meta, max_batch, max_seq, opt_batch, opt_seq)
    step_ranges = {**ranges, "sequence": (1, 1, 1)}
    profiles = {"prefill": graph_profile(meta, "prefill", ranges), "step": graph_profile(meta, "step", step_ranges)}
    form = meta.form
    plugins = [plugin_library(plugin)] if form != "decomposed" or plugin is not None else []
    tmp = staging_dir(final)
    try:
        jobs = [
            {
                "name": graph,
                "kind": "build",
                "onnx": str(meta.path(graph).resolve()),
                "output": str(tmp / ENGINE_FILES[graph]),
                "profiles": [profiles[graph]],
                "strongly_typed": strongly_typed,
                "flags": flags,
                "workspace_bytes": workspace_mib * 2**20 if workspace_mib else None,
            }
            for graph in ("prefill", "step")
        ]
        try:
            load, results = run_jobs(jobs, module=module, plugins=plugins, on_event=on_event)
        except WorkerError as e:
            raise ExportFailedError(f"TensorRT failed: {e}") from e
        failed = [r for r in results if not r.ok]
        if failed:
            r = failed[0]
            raise ExportFailedError(f"TensorRT could not build the {r.name} engine: {r.error}")
        info = {
            "producer": {"name": "gla-export", "version": __version__},
            "runtime": {"module": module, "version": load.get("version")},
            "plugin": plugins[0] if plugins else None,
            "plugin_creators": load.get("creators", []),
            "precision": precision,
            "strongly_typed": strongly_typed,
            "builder_flags": flags,
            "gla_op": form,
            "profiles": profiles,
            "engines": {
                r.name: {
                    "file": ENGINE_FILES[r.name],
                    "bytes": r.data.get("bytes"),
                    "seconds": r.data.get("seconds"),
                    "plugin_layers": r.data.get("plugin_layers"),
                    "inputs": r.data.get("inputs"),
                    "outputs": r.data.get("outputs"),
                }
                for r in results
            },
            "note": "engines are specific to the GPU and TensorRT version that built them",
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        script = tmp / SCRIPT_FILE
        script.write_text(trtexec_script(meta, profiles, strongly_typed, flags, workspace_mib, plugin=bool(plugins)))
        script.chmod(0o755)
        _move_into_place(tmp, final, force, export_dir)
    except BaseException:
        discard_staging(tmp)
        raise
    return EngineResult(final, {g: final / ENGINE_FILES[g] for g in ENGINE_FILES}, final / SCRIPT_FILE, info)


def _move_into_place(tmp: Path, final: Path, force: bool, export_dir: Path) -> None:
    from .._files import swap_into_place  # not at the top: the worker loads this file on its own

    _check_engines_dir(final, force, export_dir)  # again: something may have appeared while the engines built
    swap_into_place(tmp, final)
