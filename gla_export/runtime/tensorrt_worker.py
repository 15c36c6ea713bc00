"""The TensorRT worker: runs in the child process that :func:`gla_export.runtime.tensorrt.run_jobs`
starts, parses ONNX files and builds plans, reporting JSON lines on stdout.

This file imports the standard library only (TensorRT itself is imported by name at run time),
and the child loads it by file path: the child starts fast, without torch or gla_export, and
tests/runtime/test_tensorrt_worker.py checks that rule on this file's imports. The parent
imports it too, for :func:`load_plugin` (the one plugin loader of the decoder, verify and the
build) and the protocol constants.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

PLUGIN_OPS = ("GatedLinearAttention", "LinearAttention")
EVENT_PREFIX = "@@gla-trt@@ "


# ---- the plugin loader ---------------------------------------------------------------------------


class PluginLoadError(RuntimeError):
    """TensorRT registered no creator from the plugin library."""


_LOADED: dict[tuple[int, str], list[tuple[str, str, str]]] = {}


def load_plugin(registry: Any, library: str, messages: Any = None) -> list[tuple[str, str, str]]:
    """Load libgla_tensorrt into a TensorRT plugin registry; returns the creators it registered
    ``(name, version, namespace)``.

    ``IPluginRegistry.load_library`` can fail without raising (a library without
    ``setLoggerFinder`` is refused silently): the handle and the new creators are the evidence,
    so success means new creators appeared. Loading the same library into the same registry
    again returns what the first load registered. ``messages``: TensorRT's recent log lines, for
    the error. Raises :class:`PluginLoadError`.
    """
    key = (id(registry), os.path.realpath(library))
    if key in _LOADED:
        return _LOADED[key]
    before = {(c.name, c.plugin_version, c.plugin_namespace) for c in registry.all_creators}
    handle = registry.load_library(library)
    after = {(c.name, c.plugin_version, c.plugin_namespace) for c in registry.all_creators}
    new = sorted(after - before)
    if handle is None or not new:
        why = "; ".join(list(messages or [])[-3:]) or "no message from TensorRT"
        raise PluginLoadError(f"TensorRT could not load the plugin library {library}: it registered no creator ({why})")
    _LOADED[key] = new
    return new


# ---- the worker (child process: standard library and TensorRT only) ----------------------------


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def worker_main() -> int:
    request = json.loads(sys.stdin.read())
    import importlib

    try:
        trt = importlib.import_module(request["module"])
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        _emit({"event": "fatal", "error": f"cannot import {request['module']}: {type(e).__name__}: {e}"})
        return 1

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(f"[{str(severity).split('.')[-1]}] {msg}")

    logger = Logger()
    builder = trt.Builder(logger)
    registry = builder.get_plugin_registry() if hasattr(builder, "get_plugin_registry") else trt.get_plugin_registry()
    loaded = []
    for lib in request.get("plugins", []):
        try:
            new = load_plugin(registry, lib, logger.messages)
        except PluginLoadError as e:
            _emit({"event": "fatal", "error": str(e)})
            return 1
        loaded.extend([list(c) for c in new])
    _emit({"event": "loaded", "module": request["module"], "version": trt.__version__, "creators": loaded})

    for job in request["jobs"]:
        logger.messages.clear()
        _emit({"event": "start", "job": job["name"]})
        t0 = time.perf_counter()
        with _CapturedStderr() as captured:
            try:
                data, error = _run_job(trt, builder, logger, job), None
            except Exception as e:  # noqa: BLE001 - one failed job is a result, not the end
                data, error = {}, str(e)
        # The plugin reports on stderr when TensorRT's logger finder gives it no logger (as
        # TensorRT-RTX's does while parsing): its messages say why a node was refused.
        plugin = [ln.strip() for ln in captured.text.splitlines() if ln.startswith("[gla_tensorrt]")]
        if error is None:
            _emit({"event": "done", "job": job["name"], "seconds": round(time.perf_counter() - t0, 3),
                   "plugin_messages": plugin, **data})
        else:
            if plugin:
                error += " (plugin: " + "; ".join(m[len("[gla_tensorrt] "):] for m in plugin[-3:]) + ")"
            _emit({"event": "failed", "job": job["name"], "error": error, "messages": logger.messages[-20:],
                   "plugin_messages": plugin})
    _emit({"event": "finished"})
    return 0


class _CapturedStderr:
    """Captures file descriptor 2 (what native code prints) and replays it on exit."""

    def __enter__(self) -> _CapturedStderr:
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        raw = self._file.read()
        self._file.close()
        self.text = raw.decode("utf-8", "replace")
        if raw:
            os.write(2, raw)


def _tensor_info(t) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}


def _run_job(trt, builder, logger, job: dict[str, Any]) -> dict[str, Any]:
    flags = 0
    if job.get("strongly_typed") and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(job["onnx"]):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        detail = " | ".join(e.strip().replace("\n", " ") for e in errors) or "; ".join(logger.messages[-5:])
        if "Plugin not found" in detail and any(op in detail for op in PLUGIN_OPS):
            detail += " (load libgla_tensorrt.so: it registers the GatedLinearAttention and LinearAttention creators)"
        raise RuntimeError(f"cannot parse {job['onnx']}: {detail}")
    plugin_layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if "PLUGIN" in str(layer.type):
            plugin_layers.append(layer.name)
    data: dict[str, Any] = {
        "inputs": [_tensor_info(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [_tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
        "plugin_layers": len(plugin_layers),
        "layers": network.num_layers,
    }
    if job.get("kind", "build") == "parse":
        return data

    config = builder.create_builder_config()
    for name in job.get("flags") or []:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if job.get("workspace_bytes"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(job["workspace_bytes"]))
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for shapes in job.get("profiles") or []:
        unknown = sorted(set(shapes) - names)
        if unknown:
            raise RuntimeError(f"the profile names inputs the network does not have: {', '.join(unknown)}")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("the builder returned no plan: " + (" | ".join(logger.messages[-8:]) or "no message"))
    out = job.get("output")
    size = plan.nbytes
    if out:
        tmp = out + ".tmp"
        with open(tmp, "wb") as f:
            f.write(plan)
        os.replace(tmp, out)
    data["bytes"] = int(size)
    return data
