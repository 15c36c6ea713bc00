"""Compile the kernels for a GPU architecture on a machine without one.

The Triton interpreter accepts code that the compiler rejects (tl.dot shapes, layouts, dtype
rules), so CPU tests alone do not prove the kernels build. Inside ``compile_only(cap)`` a kernel
launch compiles for ``sm_{cap}`` through Triton's own argument specialisation and stops before
running; ptxas (shipped in the Triton wheel) reports registers, spills and shared memory.

    python -m gla_export.ops._triton.aot --arch 90 --arch 87     # every kernel variant we use

This leans on Triton internals (the active driver, ``run(warmup=True)``) that have held from
3.0 to 3.9; if they change, this tool fails loudly rather than passing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch


@dataclass
class Compiled:
    kernel: str
    variant: str
    seconds: float
    shared: int
    registers: int | None
    spills: int | None


class _CompileOnlyDriver:
    def __init__(self, cap: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cap, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _resources(kernel) -> tuple[int | None, int | None]:
    """(registers, spill bytes) from the cubin, via the Triton wheel's cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = kernel.asm.get("cubin") if hasattr(kernel, "asm") else None
    if cubin is None or not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", out) or re.findall(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (max(int(s) for s in spill) if spill else None)


@contextlib.contextmanager
def compile_only(cap: int, log: list[Compiled], variant: str = ""):
    """Within the block, ``kernel[grid](...)`` compiles for sm_{cap} and records it in ``log``."""
    from triton.runtime import driver
    from triton.runtime.jit import KernelInterface

    old_getitem = KernelInterface.__getitem__
    old_driver = getattr(driver, "_active", None)
    touched = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            # the per-device binder remembers the target it was made for: make it afresh
            self.device_caches.clear()
            touched.append(self)
            t0 = time.time()
            k = self.run(*args, grid=grid, warmup=True, **kwargs)
            if k is None:
                raise RuntimeError(f"{self.fn.__name__}: Triton returned no compiled kernel")
            regs, spills = _resources(k)
            log.append(Compiled(self.fn.__name__, variant, time.time() - t0, k.metadata.shared, regs, spills))

        return launch

    driver.set_active(_CompileOnlyDriver(cap))
    KernelInterface.__getitem__ = getitem
    try:
        yield log
    finally:
        KernelInterface.__getitem__ = old_getitem
        driver._active = old_driver  # reset_active() would look for a real GPU
        for kernel in touched:
            kernel.device_caches.clear()


def variants(full: bool = True):
    """(name, launcher call) pairs covering every kernel specialisation the op can pick."""
    from .chunk import chunk_forward
    from .recurrent import recurrent_forward

    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

    def t(*shape, dtype=f32):
        return torch.zeros(*shape, dtype=dtype)

    def chunk(dtype, K, V, gate="key", gamma=False, h0=True, varlen=False, reverse=False, Hq=4, Hkv=2):
        B, T = (1, 200) if varlen else (2, 100)
        g = None if gate == "none" else t(B, T, Hkv, K if gate == "key" else 1, dtype=dtype)
        cu = [0, 0, 70, 200] if varlen else None
        return lambda: chunk_forward(
            t(B, T, Hq, K, dtype=dtype), t(B, T, Hkv, K, dtype=dtype), t(B, T, Hkv, V, dtype=dtype), g,
            t(Hkv) if gamma else None, t(3 if varlen else B, Hkv, K, V) if h0 else None, 0.1, reverse, cu,
            torch.tensor(cu, dtype=torch.int32) if varlen else None, f32,
        )

    def rec(dtype, K, V, gate="key", gamma=False, acc=f32, varlen=False, reverse=False, B=16, Hq=4, Hkv=4):
        g = None if gate == "none" else t(B, 1, Hkv, K if gate == "key" else 1, dtype=dtype)
        return lambda: recurrent_forward(
            t(B, 1, Hq, K, dtype=dtype), t(B, 1, Hkv, K, dtype=dtype), t(B, 1, Hkv, V, dtype=dtype), g,
            t(Hkv, dtype=acc) if gamma else None, t(B, Hkv, K, V, dtype=acc), 0.1, reverse, B,
            torch.arange(B + 1, dtype=torch.int32) if varlen else None, acc, acc,
        )

    out = [
        ("chunk fp16 128x128 key-gate", chunk(f16, 128, 128)),
        ("chunk fp32 60x100 key-gate gamma varlen reverse", chunk(f32, 60, 100, gamma=True, varlen=True, reverse=True)),
        ("chunk bf16 256x512 head-gate", chunk(bf16, 256, 512, gate="head", h0=False)),
        ("chunk fp16 16x16 no-gate gamma", chunk(f16, 16, 16, gate="none", gamma=True)),
        ("recurrent fp16 256x512", rec(f16, 256, 512)),
        ("recurrent fp32 100x60 head-gate gamma varlen reverse", rec(f32, 100, 60, gate="head", gamma=True, varlen=True, reverse=True)),
        ("recurrent fp64", rec(f64, 64, 64, acc=f64, gamma=True)),
    ]
    if full:
        out += [
            ("chunk fp32 256x512 key-gate", chunk(f32, 256, 512)),
            ("chunk bf16 128x128 key-gate gamma", chunk(bf16, 128, 128, gamma=True)),
            ("chunk fp16 256x512 key-gate gamma", chunk(f16, 256, 512, gamma=True, Hq=4, Hkv=4)),
            ("chunk fp32 128x128 no-gate", chunk(f32, 128, 128, gate="none", h0=False)),
            ("recurrent bf16 128x128 no-gate", rec(bf16, 128, 128, gate="none", B=1)),
            ("recurrent fp32 256x512 B1 Hq8", rec(f32, 256, 512, B=1, Hq=8, Hkv=4)),
        ]
    return out


def check(caps: list[int], full: bool = True) -> list[Compiled]:
    log: list[Compiled] = []
    for cap in caps:
        for name, call in variants(full):
            with compile_only(cap, log, f"sm_{cap} {name}"):
                call()
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="compile the GLA Triton kernels for GPU architectures without a GPU")
    p.add_argument("--arch", type=int, action="append", help="compute capability as an integer, e.g. 90 (repeatable)")
    p.add_argument("--quick", action="store_true", help="the smaller set of variants (CI)")
    args = p.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}")
    for c in check(args.arch or [90], full=not args.quick):
        print(f"{c.variant:60s} {c.kernel:24s} {c.seconds:5.1f}s  smem {c.shared:6d}  regs {c.registers}  spill {c.spills}")


if __name__ == "__main__":
    sys.exit(main())
