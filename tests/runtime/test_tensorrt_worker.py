"""The TensorRT worker's file boundary (standard library only: the child process loads it by
path, without torch or gla_export) and the one plugin loader that the decoder, verify and the
build worker share."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gla_export.runtime import tensorrt as trt_build
from gla_export.runtime import tensorrt_worker as worker

WORKER = Path(worker.__file__)


def test_the_worker_imports_the_standard_library_only():
    tree = ast.parse(WORKER.read_text())
    imported = []
    for node in ast.walk(tree):  # every import, at the top or inside a function
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import of {node.module} (the child loads this file by path)"
            imported.append(node.module or "")
    assert imported, "no import found: the check would be vacuous"
    outside = sorted({m for m in imported if m.split(".")[0] not in sys.stdlib_module_names})
    assert outside == [], f"the worker imports {outside}; keep TensorRT behind importlib.import_module"


def test_the_worker_runs_standalone_without_gla_export():
    """Loaded by path as run_jobs does, with gla_export and torch unimportable."""
    code = (
        "import sys, importlib.util\n"
        "sys.modules['torch'] = None; sys.modules['gla_export'] = None\n"
        f"spec = importlib.util.spec_from_file_location('w', {str(WORKER)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.EVENT_PREFIX.strip(), callable(m.worker_main), callable(m.load_plugin))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["@@gla-trt@@", "True", "True"], out.stderr


class _Creator:
    def __init__(self, name):
        self.name, self.plugin_version, self.plugin_namespace = name, "1", ""


class _Registry:
    def __init__(self, registers):
        self.all_creators, self.registers, self.calls = [_Creator("Other")], registers, 0

    def load_library(self, path):
        self.calls += 1
        self.all_creators = self.all_creators + [_Creator(n) for n in self.registers]
        return object()


def test_a_library_that_registers_no_creator_is_refused():
    with pytest.raises(worker.PluginLoadError, match="registered no creator.*refused here"):
        worker.load_plugin(_Registry([]), "/nowhere/libnothing.so", ["refused here"])


def test_loading_succeeds_on_new_creators_once_per_registry(tmp_path):
    lib = tmp_path / "libgla_tensorrt.so"
    lib.write_bytes(b"")
    reg = _Registry(list(worker.PLUGIN_OPS))
    got = worker.load_plugin(reg, str(lib))
    assert [c[0] for c in got] == sorted(worker.PLUGIN_OPS)
    assert worker.load_plugin(reg, str(lib)) == got and reg.calls == 1  # the decoder and verify may both load it


def test_the_real_plugin_registers_its_creators():
    """libgla_tensorrt in TensorRT(-RTX)'s registry, in a child process (as the build worker does)."""
    module = trt_build.available_module()
    if module is None:
        pytest.skip("no TensorRT Python package (tensorrt or tensorrt_rtx) installed")
    from gla_export._native import find_library

    lib = find_library("trt")
    if lib is None:
        pytest.skip("libgla_tensorrt is not built")
    code = (
        "import importlib, importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('w', {str(WORKER)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"trt = importlib.import_module({module!r})\n"
        f"print(json.dumps(m.load_plugin(trt.get_plugin_registry(), {str(lib)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=trt_build.child_env(module))
    assert out.returncode == 0, out.stderr[-2000:]
    names = {c[0] for c in json.loads(out.stdout.strip().splitlines()[-1])}
    assert set(worker.PLUGIN_OPS) <= names
