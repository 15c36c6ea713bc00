"""aarch64: the cross build of the native parts and its run under qemu-user (docs/arm64.md).

tools/arm64/build.sh cross-compiles the CPU parts with Debian's aarch64 toolchain, and
tools/arm64/test.sh runs them under qemu-user against the float64 reference and the x86-64 build:
the NEON and portable kernels, one-node graphs on the aarch64 ONNX Runtime, and the sample
model's greedy decode by the aarch64 gla-run.

Without the cross compiler or qemu these tests skip on a developer machine; with GLA_REQUIRE_ARM=1
(CI sets it and installs the tools, see .ci/run) a missing tool fails them instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("GLA_ARM64_BUILD_DIR", ROOT / "build" / "arm64"))
SYSROOT = Path("/usr/aarch64-linux-gnu")

pytestmark = pytest.mark.slow


def _missing_tools() -> list[str]:
    missing = []
    if shutil.which("aarch64-linux-gnu-g++") is None:
        missing.append("aarch64-linux-gnu-g++ (g++-aarch64-linux-gnu)")
    if shutil.which("qemu-aarch64") is None and shutil.which("qemu-aarch64-static") is None:
        missing.append("qemu-aarch64 (qemu-user)")
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        missing.append("the aarch64 C runtime (libc6-arm64-cross)")
    if shutil.which("cmake") is None:
        missing.append("cmake")
    return missing


def _run(cmd: list[str], timeout: float, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHON=sys.executable, GLA_ARM64_BUILD_DIR=str(BUILD), **env)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env, check=False)
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:], file=sys.stderr)
    return proc


@pytest.fixture(scope="module")
def arm64_build():
    missing = _missing_tools()
    if missing:
        why = "aarch64 cross build and emulation need " + ", ".join(missing)
        if os.environ.get("GLA_REQUIRE_ARM") == "1":
            pytest.fail(why + " (GLA_REQUIRE_ARM=1: apt-get install -y --no-install-recommends "
                        "g++-aarch64-linux-gnu qemu-user)")
        pytest.skip(why)
    proc = _run(["bash", "tools/arm64/build.sh"], timeout=1200)
    assert proc.returncode == 0, (
        f"tools/arm64/build.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    )
    return BUILD


def _emulated(part: str) -> list[str]:
    """Runs test.sh for one part; returns its result lines after checking that none failed."""
    seed = str(torch.initial_seed() % (2**31))
    proc = _run(["bash", "tools/arm64/test.sh", part], timeout=900, GLA_TEST_SEED=seed)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok ", "FAIL "))]
    failed = [ln for ln in lines if ln.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, (
        f"tools/arm64/test.sh {part} (seed {seed}) exit {proc.returncode}:\n" + "\n".join(failed or lines)
        + "\n" + proc.stderr[-3000:]
    )
    return lines


def test_cross_build_makes_aarch64_binaries(arm64_build):
    for rel in ("plugins/kernels/libgla_kernels_capi.so", "plugins/onnxruntime/libgla_onnxruntime.so",
                "runtimes/gla-run", "tools/gla-kernel-check", "tools/gla-ort-node"):
        head = (arm64_build / rel).read_bytes()[:20]
        # e_machine 183: EM_AARCH64
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, f"{rel} is not aarch64"
    # the NEON build of the hot loops is in the kernel core; the x86 ones are not
    symbols = (arm64_build / "plugins/kernels/libgla_kernels_capi.so").read_bytes()
    assert b"neon" in symbols and b"avx512" not in symbols


def test_kernels_neon_and_portable_match_reference_under_qemu(arm64_build):
    from importlib import util

    spec = util.spec_from_file_location("emulated_checks", ROOT / "tools/arm64/emulated_checks.py")
    checks = util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    lines = _emulated("kernels")
    for isa in ("neon", "generic"):
        # the driver ran the build it was asked for, and every case was compared
        assert any(re.match(rf"ok   kernels\[{isa}\]: the aarch64 library.* ran its {isa} build", ln) for ln in lines)
        cases = [ln for ln in lines if re.match(rf"ok   kernels\[{isa}\] B", ln)]
        assert len(cases) == len(checks.KERNEL_CASES), lines
    dtypes = " ".join(lines)
    assert all(dt in dtypes for dt in ("fp32", "fp16", "bf16", "-T1-", "-T65-"))


def test_onnxruntime_op_one_node_graphs_under_qemu(arm64_build):
    lines = _emulated("op")
    assert len([ln for ln in lines if ln.startswith("ok   op ")]) == 3, lines


def test_sample_export_decodes_same_tokens_as_x86_under_qemu(arm64_build):
    lines = _emulated("decode")
    decoded = [ln for ln in lines if ln.startswith("ok   decode[")]
    assert len(decoded) == 2, lines  # with prefill, and step by step


def test_pip_wheel_cross_build_packs_aarch64_libraries(arm64_build):
    """`pip wheel .` (scikit-build-core, the path `pip install .` takes on an aarch64 machine) with the
    aarch64 toolchain: the package's libraries and gla-run are aarch64, with the NEON build."""
    import zipfile

    proc = _run(["bash", "tools/arm64/build.sh", "--wheel"], timeout=1200)
    assert proc.returncode == 0, f"build.sh --wheel failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    (wheel,) = (arm64_build / "wheel").glob("gla_export-*-linux_aarch64.whl")
    with zipfile.ZipFile(wheel) as z:
        natives = {n: z.read(n) for n in z.namelist() if n.startswith(("gla_export/lib/", "gla_export/bin/"))}
    assert set(natives) >= {"gla_export/lib/libgla_kernels_capi.so", "gla_export/lib/libgla_onnxruntime.so",
                            "gla_export/bin/gla-run"}, sorted(natives)
    for name, data in natives.items():
        assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 183, f"{name} is not aarch64"
    assert b"neon" in natives["gla_export/lib/libgla_kernels_capi.so"]
    # and the installed layout works: its gla-run finds its own custom-op library and decodes
    lines = _emulated("wheel")
    assert len([ln for ln in lines if ln.startswith("ok   decode[wheel ")]) == 1, lines
