"""Constant memory, measured: decoding 16 384 tokens needs no more memory than decoding 64.

Measured in a child process (a clean baseline, nothing left over from other tests): resident set
size and its peak on the CPU; on a GPU, the device memory in use (ONNX Runtime's arena
included, which torch's allocator statistics do not see). The CPU peak is the child's own
high-water mark, ``VmHWM`` of /proc/self/status: it belongs to the address space, which exec
replaces. (``ru_maxrss`` would not do: on Linux it survives fork and exec, so the child would
report the pytest parent's peak whenever that was higher, and the peak check could never fail.)

Two controls in the same child show that a flat reading is not a blind one: it leaks on purpose
(keeps a copy of each step's logits, ~1 KiB per token), which the memory in use must show; and
on the CPU it touches a 16 MiB buffer for a moment and frees it, which the peak must show.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from gla_export.export import export_model
from gla_export.models import GLAForCausalLM, load_model, recommended_config, sample_model_path

LONG, SHORT = 16384, 64
MARGIN = 2 * 2**20  # allocator noise; a decoder keeping anything per token would pass this within ~2k tokens
SPIKE = 16 * 2**20  # the peak's control: well above the gap between the peak and the memory in use

CHILD = textwrap.dedent(
    """
    import gc, json, sys, time
    import numpy as np, psutil, torch
    torch.set_num_threads(1)
    from gla_export.runtime.decoder import StatefulDecoder
    from gla_export.runtime.sampling import SamplingParams

    export, backend, short, long = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    SPIKE = int(sys.argv[5])
    proc = psutil.Process()
    cuda = backend != "ort-cpu"

    def used():
        if cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            return total - free
        return proc.memory_info().rss

    def peak():
        if cuda:
            return torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as f:  # this process's own high-water mark (see the module docstring)
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
        raise RuntimeError("/proc/self/status has no VmHWM: the peak cannot be measured here")

    dec = StatefulDecoder(export, backend, threads=1)
    params = SamplingParams(temperature=1.0, seed=0)  # sampling: the tokens wander, as in real use

    def decode(n):
        trace = []
        gen = dec.generate("In the beginning", max_new_tokens=n, sampling=params, ignore_eos=True, keep_tokens=False)
        for i, _ in enumerate(gen):
            if i % 1024 == 1023:
                trace.append(used())
        gc.collect()
        return trace

    decode(short)  # warm-up: sessions, arenas, first-call allocations
    gc.collect()
    out = {"state_bytes": dec.state_nbytes, "runtime": dec.runtime_name}
    t = time.perf_counter()
    decode(short)
    out["short"] = {"used": used(), "peak": peak(), "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    trace = decode(long)
    out["long"] = {"used": used(), "peak": peak(), "seconds": time.perf_counter() - t, "trace": trace}

    # the instrument's control: keep ~1 KiB per token for 2048 tokens
    before = used()
    kept = []
    logits = dec.prefill([[256, 1, 2]])
    for i in range(2048):
        logits = dec.step([i % 256])
        kept.append(dec._logits_dev.clone() if cuda else logits.copy())  # where the decoder's memory is
    out["leak"] = {"bytes_kept": sum(k.nelement() * k.element_size() if cuda else k.nbytes for k in kept), "growth": used() - before}
    if not cuda:  # the peak's control: a short spike that the memory in use no longer shows afterwards
        before = peak()
        spike = np.ones(SPIKE // 8)  # written, so every page is resident
        del spike
        out["spike"] = {"bytes": SPIKE, "peak_growth": peak() - before}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sample_export(tmp_path_factory):
    """The sample model's export (a random model of the sample's architecture until the trained one
    is committed: the same shapes, so the same memory behaviour)."""
    if (sample_model_path() / "config.json").is_file():
        model = load_model(sample_model_path())
    else:
        torch.manual_seed(0)
        model = GLAForCausalLM(recommended_config("sample", initializer_range=0.3))
    out = tmp_path_factory.mktemp("memory") / "sample"
    # the default form: our custom-op library is part of what must not grow
    return export_model(model, out, gla_op="custom", validate=False, progress=False).out_dir


def measure(export_dir, backend: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(export_dir), backend, str(SHORT), str(LONG), str(SPIKE)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_flat(m: dict, peak_control: bool) -> None:
    short, long = m["short"], m["long"]
    mib = 2**20
    report = (f"{m['runtime']}: state {m['state_bytes'] / 1024:.0f} KiB/conversation; in use after {SHORT} tokens "
              f"{short['used'] / mib:.1f} MiB, after {LONG} {long['used'] / mib:.1f} MiB; peak {short['peak'] / mib:.1f} -> "
              f"{long['peak'] / mib:.1f} MiB; {LONG / long['seconds']:.0f} tokens/s; every 1024 tokens: "
              + " ".join(f"{u / mib:.1f}" for u in long["trace"])
              + f"; controls: a {m['leak']['bytes_kept'] / mib:.1f} MiB leak grew the memory in use by "
              f"{m['leak']['growth'] / mib:.1f} MiB"
              + (f", a {m['spike']['bytes'] / mib:.0f} MiB spike the peak by {m['spike']['peak_growth'] / mib:.1f} MiB"
                 if "spike" in m else ""))
    print(report)
    assert long["peak"] - short["peak"] <= MARGIN, report
    assert long["used"] - short["used"] <= MARGIN, report
    assert max(long["trace"]) - min(long["trace"]) <= MARGIN, report
    assert m["leak"]["growth"] >= m["leak"]["bytes_kept"] / 2, f"the measurement cannot see a {m['leak']} leak"
    if peak_control:
        assert m["spike"]["peak_growth"] >= m["spike"]["bytes"] / 2, f"the peak cannot see a {m['spike']} spike"


@pytest.mark.slow
def test_cpu_memory_is_flat_from_64_to_16384_tokens(sample_export):
    check_flat(measure(sample_export, "ort-cpu"), peak_control=True)


@pytest.mark.gpu
def test_gpu_memory_is_flat_from_64_to_16384_tokens(sample_export):
    check_flat(measure(sample_export, "ort-cuda"), peak_control=False)  # torch's counter: per process
