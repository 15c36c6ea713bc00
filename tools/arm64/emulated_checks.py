"""The aarch64 build (tools/arm64/build.sh) run under qemu-user and checked against x86-64.

Run by tools/arm64/test.sh (which finds qemu, the aarch64 sysroot and ONNX Runtime's aarch64
library); every input and every reference is made here, on the build machine, at run time:

* ``kernels``: random problems (prefill and step, fp32/fp16/bf16, odd sizes, GQA, ragged, reverse,
  final state) through the kernel core's C API (gla-kernel-check), once with the NEON build of the
  hot loops and once with the portable one, against the float64 naive reference;
* ``op``: one-node ``gla::GatedLinearAttention`` graphs on the aarch64 ONNX Runtime with the aarch64
  custom-op library (gla-ort-node), against the same reference;
* ``decode``: the bundled sample model exported here (custom op, fp32), decoded greedily by the
  aarch64 gla-run on the aarch64 ONNX Runtime, with prefill and step by step: the same token ids as
  the x86-64 gla-run on the x86-64 ONNX Runtime;
* ``wheel``: the same with the gla-run of the aarch64 wheel (build.sh --wheel), unpacked as pip
  installs it, finding its own custom-op library.

Prints one line per case ("ok ..." or "FAIL ...") and exits 1 when any case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gla_export.ops.native import make_problem  # noqa: E402
from gla_export.testing import GLACase, make_inputs, reference, rel_err  # noqa: E402

# the bounds of tests/kernels/test_cpu_kernels.py (measured errors there: ~3e-7, ~2e-4, ~2e-3)
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# A few short cases (qemu runs ~20-50x slower than the host): the decode path (T = 1, direct
# state rows), step by step below the chunk threshold, the chunked form with partial chunks,
# several value blocks, GQA, per-head gates, reverse, ragged sequences, and each dtype for both
# activations and states. Sizes are odd on purpose (tails of every vector loop).
KERNEL_CASES: list[tuple[GLACase, torch.dtype | None]] = [
    (GLACase(B=3, T=1, Hq=4, Hkv=2, K=60, V=100, initial_state=True), None),
    (GLACase(B=2, T=1, Hq=2, Hkv=2, K=17, V=33, dtype=torch.float16, initial_state=True, g_gamma=True), None),
    (GLACase(B=2, T=1, Hq=4, Hkv=2, K=64, V=48, dtype=torch.bfloat16, initial_state=True), torch.bfloat16),
    (GLACase(B=2, T=23, Hq=2, Hkv=1, K=17, V=33, initial_state=True), None),
    (GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=torch.float16, initial_state=True, g_gamma=True), None),
    (GLACase(B=1, T=70, Hq=6, Hkv=1, K=16, V=48, reverse=True, gate_per_head=True), None),
    (GLACase(Hq=2, Hkv=2, K=16, V=60, cu_seqlens=(0, 30, 30, 95, 96), initial_state=True), None),
    (GLACase(B=1, T=100, K=100, V=16, dtype=torch.bfloat16, initial_state=True), torch.float16),
    (GLACase(B=1, T=40, Hq=2, Hkv=2, K=33, V=150, initial_state=True), None),
]

OP_CASES: list[GLACase] = [
    GLACase(B=2, T=1, Hq=4, Hkv=2, K=60, V=100, initial_state=True),  # a decode step
    GLACase(B=2, T=37, Hq=4, Hkv=2, K=60, V=100, dtype=torch.float16, initial_state=True, g_gamma=True),
    GLACase(B=1, T=30, Hq=2, Hkv=2, K=17, V=33, dtype=torch.bfloat16),
]

DECODE_PROMPT = "In the beginning God created the heaven and the earth."  # 56 tokens: chunked prefill
DECODE_TOKENS = 24


class Emulator:
    def __init__(self, args: argparse.Namespace):
        self.qemu = args.qemu
        self.sysroot = args.sysroot
        self.build = Path(args.build).resolve()
        # the libraries under test: this build's, or another aarch64 build's (--libs)
        self.libs = Path(args.libs or args.build).resolve()
        self.capi_dir = self.libs / "plugins" / "kernels"
        self.gla_lib = str(self.libs / "plugins" / "onnxruntime" / "libgla_onnxruntime.so")
        self.ort_lib = args.ort_lib
        self.cpuinfo = args.cpuinfo
        self.shim = self.build / "tools" / "libgla_cpuinfo_shim.so"

    def run(self, argv: list[str], *, cpu: str = "neoverse-n1", env: dict | None = None, ort: bool = False,
            timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [self.qemu, "-cpu", cpu, "-L", self.sysroot]
        if ort:  # ONNX Runtime's CPU detection needs an Arm /proc/cpuinfo (tools/arm64/cpuinfo_shim.c)
            cmd += ["-E", f"LD_PRELOAD={self.shim}", "-E", f"GLA_FAKE_CPUINFO={self.cpuinfo}"]
        full_env = dict(os.environ)
        full_env.pop("GLA_CPU_ISA", None)
        full_env.update(env or {})
        cmd += ["-E", f"LD_LIBRARY_PATH={self.capi_dir}"]  # searched before gla-kernel-check's RUNPATH
        return subprocess.run(cmd + argv, capture_output=True, text=True, env=full_env, timeout=timeout, check=False)


def _bytes(t: torch.Tensor | None) -> bytes:
    return b"" if t is None else t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)


def _case_id(case: GLACase, state_dtype: torch.dtype | None = None) -> str:
    return case.id + (f"-state_{str(state_dtype).split('.')[-1]}" if state_dtype is not None else "")


def _report(name: str, errs: list[tuple[str, float, float]]) -> bool:
    bad = [f"{what} {err:.2e} > {tol:.0e}" for what, err, tol in errs if not err <= tol]
    detail = ", ".join(f"{what} {err:.1e}" for what, err, _ in errs)
    print(("FAIL " if bad else "ok   ") + f"{name}: {'; '.join(bad) if bad else detail}", flush=True)
    return not bad


def check_kernels(emu: Emulator, work: Path, seed: int) -> bool:
    """Each case through gla-kernel-check under qemu, NEON and portable builds, vs the reference."""
    cases = []
    for i, (case, state_dtype) in enumerate(KERNEL_CASES):
        kw = make_inputs(case, seed=seed + i)
        if state_dtype is not None:
            kw["initial_state"] = kw["initial_state"].to(state_dtype)
        problem = make_problem(kw["q"], kw["k"], kw["v"], kw["g"], None, kw.get("initial_state"), kw.get("g_gamma"),
                               kw["reverse"], kw.get("cu_seqlens"))
        blobs = [_bytes(kw.get(n)) for n in ("q", "k", "v", "g", "initial_state", "cu_seqlens", "g_gamma")]
        header = bytes(problem) + b"".join(len(b).to_bytes(8, "little") for b in blobs)
        path = work / f"kernel{i}.in"
        path.write_bytes(header + b"".join(blobs))
        cases.append((case, state_dtype, kw, path))

    ok = True
    # the NEON build on the ARMv8.0 baseline core (no instruction of a later extension may sneak
    # in), two threads; the portable build on one
    for isa, cpu, threads in (("neon", "cortex-a57", 2), ("generic", "neoverse-n1", 1)):
        argv = [str(emu.build / "tools" / "gla-kernel-check"), "--threads", str(threads)]
        for i, (_, _, _, path) in enumerate(cases):
            argv += [str(path), str(work / f"kernel{i}.{isa}.out")]
        t0 = time.perf_counter()
        proc = emu.run(argv, cpu=cpu, env={"GLA_CPU_ISA": "generic"} if isa == "generic" else None)
        took = time.perf_counter() - t0
        got_isa = proc.stdout.split("isa:", 1)[1].split()[0] if "isa:" in proc.stdout else "?"
        if proc.returncode != 0 or got_isa != isa:
            print(f"FAIL kernels[{isa}]: exit {proc.returncode}, isa {got_isa!r}: {proc.stderr.strip()}", flush=True)
            ok = False
            continue
        cuda = " with CUDA kernels built in" if "cuda_compiled: 1" in proc.stdout else ""
        print(f"ok   kernels[{isa}]: the aarch64 library{cuda} ran its {isa} build on qemu -cpu {cpu} "
              f"({len(cases)} cases, {took:.1f} s)", flush=True)
        for i, (case, state_dtype, kw, _) in enumerate(cases):
            o_ref, s_ref = reference(kw)
            data = (work / f"kernel{i}.{isa}.out").read_bytes()
            s_dtype = kw["initial_state"].dtype if "initial_state" in kw else torch.float32
            n_out = o_ref.numel() * torch.empty(0, dtype=case.dtype).element_size()
            o = _from_bytes(data[:n_out], case.dtype, o_ref.shape)
            s = _from_bytes(data[n_out:], s_dtype, s_ref.shape)
            tol_s = max(TOL[case.dtype], TOL[s_dtype])
            ok &= _report(f"kernels[{isa}] {_case_id(case, state_dtype)}",
                          [("output", rel_err(o, o_ref), TOL[case.dtype]), ("state", rel_err(s, s_ref), tol_s)])
    return ok


def _one_node_model(feeds: dict[str, torch.Tensor], q_heads: int, kv_heads: int) -> bytes:
    import onnx
    from onnx import helper

    from gla_export.export.graph import TORCH_TO_ONNX

    order = ("query", "key", "value", "gate", "past_state", "cu_seqlens", "g_gamma")
    names = [n if n in feeds else "" for n in order]
    while names and not names[-1]:
        names.pop()
    inputs = [helper.make_tensor_value_info(n, TORCH_TO_ONNX[feeds[n].dtype], None) for n in names if n]
    node = helper.make_node("GatedLinearAttention", names, ["output", "present_state"], domain="gla",
                            q_num_heads=q_heads, kv_num_heads=kv_heads)
    outputs = [helper.make_value_info(n, onnx.TypeProto()) for n in ("output", "present_state")]
    graph = helper.make_graph([node], "gla_one_node", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("gla", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def check_op(emu: Emulator, work: Path, seed: int) -> bool:
    """One-node graphs on the aarch64 ONNX Runtime + custom-op library under qemu, vs the reference."""
    ok = True
    for i, case in enumerate(OP_CASES):
        kw = make_inputs(case, seed=seed + 100 + i)
        B, T = kw["q"].shape[:2]
        feeds = {n: kw[k].reshape(B, T, -1) for n, k in (("query", "q"), ("key", "k"), ("value", "v"), ("gate", "g"))}
        for name, key in (("past_state", "initial_state"), ("cu_seqlens", "cu_seqlens"), ("g_gamma", "g_gamma")):
            if key in kw:
                feeds[name] = kw[key]
        d = work / f"op{i}"
        d.mkdir()
        (d / "model.onnx").write_bytes(_one_node_model(feeds, case.Hq, case.Hkv))
        for name, t in feeds.items():
            (d / f"{name}.bin").write_bytes(_bytes(t))
            (d / f"{name}.shape").write_text(" ".join(map(str, t.shape)))
        t0 = time.perf_counter()
        proc = emu.run([str(emu.build / "tools" / "gla-ort-node"), emu.ort_lib, emu.gla_lib, str(d / "model.onnx"),
                        str(d)], ort=True)
        took = time.perf_counter() - t0
        name = f"op {case.id}"
        if proc.returncode != 0:
            print(f"FAIL {name}: gla-ort-node exit {proc.returncode}: {proc.stderr.strip()[-2000:]}", flush=True)
            ok = False
            continue
        o_ref, s_ref = reference(kw)
        o_ref = o_ref.reshape(B, T, -1)
        got = {}
        for out, dtype in (("output", case.dtype), ("present_state", torch.float32)):
            shape = [int(x) for x in (d / f"out.{out}.shape").read_text().split()]
            got[out] = _from_bytes((d / f"out.{out}.bin").read_bytes(), dtype, shape)
        ok &= _report(f"{name} ({took:.1f} s)", [("output", rel_err(got["output"], o_ref), TOL[case.dtype]),
                                                  ("present_state", rel_err(got["present_state"], s_ref),
                                                   TOL[case.dtype])])
    return ok


def check_decode(emu: Emulator, work: Path, export_dir: str | None, wheel: str | None = None) -> bool:
    """The sample export decoded by gla-run: aarch64 under qemu vs x86-64, prefill and step only.
    With ``wheel``: by the gla-run of that aarch64 wheel's installed layout instead, which must find
    its custom-op library by itself (gla_export/bin/../lib), with prefill."""
    import stat
    import zipfile

    from gla_export._runner import find_gla_run, run_gla_run

    if export_dir is None:
        from gla_export.export.api import export_model

        export_dir = str(work / "sample-export")
        t0 = time.perf_counter()
        export_model(None, export_dir, gla_op="custom", dtype="fp32", validate=False, progress=False)
        print(f"ok   decode: exported the sample model on x86-64 in {time.perf_counter() - t0:.1f} s", flush=True)
    native = find_gla_run()
    if native is None:
        print("FAIL decode: the x86-64 gla-run is not built (pip install . builds it), nothing to compare with")
        return False
    runs = [("prefill", str(emu.build / "runtimes" / "gla-run"), True, ["--gla-lib", emu.gla_lib]),
            ("step-only", str(emu.build / "runtimes" / "gla-run"), False, ["--gla-lib", emu.gla_lib])]
    if wheel is not None:
        root = work / "wheel"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root)
        runner = root / "gla_export" / "bin" / "gla-run"
        runner.chmod(runner.stat().st_mode | stat.S_IXUSR)
        runs = [(f"wheel {Path(wheel).name}", str(runner), True, [])]
    ok = True
    for mode, runner_path, prefill, lib_args in runs:
        want = run_gla_run(export_dir, prompt=DECODE_PROMPT, max_new_tokens=DECODE_TOKENS, ignore_eos=True,
                           prefill=prefill, threads=1).ids
        argv = [runner_path, "--export", export_dir, "--prompt", DECODE_PROMPT, "--max-new-tokens",
                str(DECODE_TOKENS), "--ignore-eos", "--threads", "1", "--format", "json", "--ort-lib", emu.ort_lib,
                *lib_args]
        if not prefill:
            argv.append("--no-prefill")
        t0 = time.perf_counter()
        proc = emu.run(argv, ort=True)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"FAIL decode[{mode}]: aarch64 gla-run exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
            ok = False
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        same = got["ids"] == list(want)
        if wheel is not None and "/gla_export/bin/../lib/libgla_onnxruntime.so" not in got.get("backend", ""):
            print(f"FAIL decode[{mode}]: gla-run did not take the wheel's own library: {got.get('backend')}")
            ok = False
        print(("ok   " if same else "FAIL ") + f"decode[{mode}]: aarch64 {got['ids']} {'==' if same else '!='} "
              f"x86-64 {list(want)} ({len(got['ids'])} tokens, text {got.get('text')!r}, {took:.1f} s under qemu)",
              flush=True)
        ok &= same
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", default=["kernels", "op", "decode"],
                    choices=["kernels", "op", "decode", "wheel"])
    ap.add_argument("--build", default=str(ROOT / "build" / "arm64"))
    ap.add_argument("--libs", help="an aarch64 build folder whose libraries to test (default: --build), e.g. "
                    "build/arm64-cuda: the CUDA-enabled libraries on their CPU path")
    ap.add_argument("--qemu", default="qemu-aarch64")
    ap.add_argument("--sysroot", default="/usr/aarch64-linux-gnu")
    ap.add_argument("--ort-lib", help="the aarch64 libonnxruntime.so (op and decode)")
    ap.add_argument("--cpuinfo", help="an aarch64 /proc/cpuinfo for ONNX Runtime (op and decode)")
    ap.add_argument("--export", help="an export to decode (default: export the sample model)")
    ap.add_argument("--wheel", help="the aarch64 wheel for the wheel part (default: the newest in BUILD/wheel)")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("GLA_TEST_SEED", 20261207)),
                    help="inputs' seed (default: GLA_TEST_SEED, else fixed)")
    args = ap.parse_args(argv)
    if {"op", "decode", "wheel"} & set(args.parts) and not (args.ort_lib and args.cpuinfo):
        ap.error("op, decode and wheel need --ort-lib and --cpuinfo")
    if "wheel" in args.parts and args.wheel is None:
        wheels = sorted((Path(args.build) / "wheel").glob("gla_export-*-linux_aarch64.whl"), key=os.path.getmtime)
        if not wheels:
            ap.error(f"no aarch64 wheel in {Path(args.build) / 'wheel'}: run tools/arm64/build.sh --wheel")
        args.wheel = str(wheels[-1])
    emu = Emulator(args)
    print(f"seed {args.seed}", flush=True)
    torch.set_num_threads(1)
    ok = True
    with tempfile.TemporaryDirectory(prefix="gla-arm64-") as tmp:
        for part in args.parts:
            work = Path(tmp) / part
            work.mkdir()
            if part == "kernels":
                ok &= check_kernels(emu, work, args.seed)
            elif part == "op":
                ok &= check_op(emu, work, args.seed)
            elif part == "decode":
                ok &= check_decode(emu, work, args.export)
            else:
                ok &= check_decode(emu, work, args.export, wheel=args.wheel)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
