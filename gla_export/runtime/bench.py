"""``gla-export bench``: our runtimes side by side with PyTorch eager and flash-linear-attention.

One run measures, for every contender available on this machine:

- prefill throughput (prompt tokens per second) at each batch size;
- decode latency per token and tokens per second at each batch size (greedy: the logits go to
  an argmax and the chosen tokens are fed back, as in generation);
- per-token cost against the context length: the memory needed to produce the next token at
  context L beyond the weights (what is kept between tokens — the state, for the stateful
  contenders — plus the peak of the transient allocations while producing it), and its latency.

Contenders:

- ``ours: ORT CPU`` / ``ours: ORT CUDA`` / ``ours: TensorRT``: the export through
  :class:`~gla_export.runtime.decoder.StatefulDecoder` (prefill.onnx once, then step.onnx with two
  swapped state buffers);
- ``ours: gla-run (C++)``: the C++ runner at batch 1 (its own timings);
- ``PyTorch eager``: our GLAForCausalLM, carrying its recurrent states token to token;
- ``PyTorch eager, no cache``: the same model recomputing the whole context for every token
  (the context plots only: what decoding costs without a state);
- ``fla GLAForCausalLM``: flash-linear-attention's model with its cache (Triton kernels: needs a
  CUDA GPU), the peer of the target "decode tokens/s at batch 1 ≥ 2× PyTorch eager with fla
  kernels on the same GPU".

Contexts are reached by a prefill; what is measured at each is the next token, not the prompt.
Memory is measured as CUDA allocated bytes for PyTorch (``max_memory_allocated``), device-wide used
bytes for ONNX Runtime on a GPU (``cudaMemGetInfo``; its arena is invisible to PyTorch), and the
process's sampled resident set on the CPU. Latencies are means over the timed calls after warm-up
(each call synchronises, as greedy decoding must), prefill times the median of the repeats.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import MissingRuntimeError, ModelError, UsageError, first_line
from .verify import _one_line

DEFAULT_BATCHES = (1, 16)
DEFAULT_CONTEXTS = (64, 256, 1024, 4096, 16384)
TARGET_RATIO = 2.0
OURS_ORT_CPU, OURS_ORT_CUDA, OURS_TRT, OURS_CPP = (
    "ours: ORT CPU",
    "ours: ORT CUDA",
    "ours: TensorRT",
    "ours: gla-run (C++)",
)
OURS_ORT_CUDA_NOGRAPH = "ours: ORT CUDA, no graph"
EAGER, RECOMPUTE, FLA = "PyTorch eager", "PyTorch eager, no cache", "fla GLAForCausalLM"
# short names (the CLI's --only) of the contenders
KEYS = {
    "ort-cpu": OURS_ORT_CPU,
    "ort-cuda": OURS_ORT_CUDA,
    "ort-cuda-nograph": OURS_ORT_CUDA_NOGRAPH,
    "trt": OURS_TRT,
    "gla-run": OURS_CPP,
    "eager": EAGER,
    "recompute": RECOMPUTE,
    "fla": FLA,
}


@dataclass
class BenchSettings:
    batches: tuple[int, ...] = DEFAULT_BATCHES
    prefill_len: int = 512
    decode_tokens: int = 128
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    warmup: int = 3
    repeats: int = 3
    seed: int = 0
    threads: int | None = None  # ONNX Runtime and PyTorch CPU threads (None: their defaults)

    def check(self) -> None:
        for name in ("prefill_len", "decode_tokens", "warmup", "repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise UsageError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("batches", "contexts"):
            v = getattr(self, name)
            if not v or any(not isinstance(x, int) or x < 1 for x in v):
                raise UsageError(f"{name} must be positive integers, got {list(v)!r}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")


@dataclass
class Result:
    name: str
    detail: str = ""
    prefill: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> tokens_per_s, ms
    decode: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> ms_per_token, tokens_per_s
    context: dict[int, dict[str, float]] = field(default_factory=dict)  # L -> bytes, ms_per_token
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        key = lambda d: {str(k): v for k, v in d.items()}  # noqa: E731 - JSON keys are strings
        return {
            "name": self.name,
            "detail": self.detail,
            "prefill": key(self.prefill),
            "decode": key(self.decode),
            "context": key(self.context),
            "notes": self.notes,
        }


@dataclass
class BenchReport:
    export_dir: str
    device: dict[str, Any]
    model: dict[str, Any]
    settings: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # the decode floor (runtime/floor.py): copy bandwidth measured in this run, bytes per step
    copy_bandwidth: dict[str, Any] = field(default_factory=dict)
    floor: dict[str, Any] = field(default_factory=dict)

    def result(self, name: str) -> Result | None:
        return next((r for r in self.results if r.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "export_dir": self.export_dir,
            "device": self.device,
            "model": self.model,
            "settings": self.settings,
            "results": [r.as_dict() for r in self.results],
            "skipped": self.skipped,
            "target": self.target,
            "copy_bandwidth": self.copy_bandwidth,
            "floor": {k: ({str(b): x for b, x in v.items()} if isinstance(v, dict) else v)
                      for k, v in self.floor.items()},
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _tune_malloc() -> None:
    """Make the resident set follow what is live. glibc keeps memory a call freed in its heap, and
    after freeing a large mapped block it raises its mmap threshold, so the next call's large
    buffers come from that heap and its peak hides. Pinning the threshold at glibc's own default
    (128 KiB; this only switches off the raising, for the rest of the process) sends large blocks
    back to the system when freed, and trimming before each measurement returns the heap's free
    pages."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def rss_bytes() -> int:
    """This process's resident memory in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Memory:
    """Peak extra memory of a call on one device (see the module docstring for what is counted)."""

    def __init__(self, device: torch.device, torch_allocations: bool):
        self.device, self.torch_allocations = device, torch_allocations

    def measure(self, fn: Callable[[], Any]) -> tuple[int, float, Any]:
        """(peak extra bytes, seconds, result of fn)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if self.torch_allocations:
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                t = time.perf_counter()
                out = fn()
                torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t
                return torch.cuda.max_memory_allocated(self.device) - before, dt, out
            free_before, _ = torch.cuda.mem_get_info(self.device)
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t
            free_after, _ = torch.cuda.mem_get_info(self.device)
            return max(0, free_before - free_after), dt, out
        # CPU: sample the resident set while fn runs (the kernels release the GIL)
        _tune_malloc()
        before = rss_bytes()
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.0005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t = time.perf_counter()
        try:
            out = fn()
        finally:
            dt = time.perf_counter() - t
            stop.set()
            th.join()
        peak[0] = max(peak[0], rss_bytes())
        return max(0, peak[0] - before), dt, out


def _tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of every tensor reachable from obj (a model's state list, fla's cache)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------


class Contender:
    name: str
    detail: str = ""

    def prefill(self, ids: np.ndarray) -> None:
        raise NotImplementedError

    def decode(self, first: np.ndarray, n: int, warmup: int) -> float:
        """Seconds per greedy step at batch ``len(first)``, after ``warmup`` untimed steps."""
        raise NotImplementedError

    def at_context(self, ids: np.ndarray, memory: _Memory) -> tuple[int, float]:
        """(bytes, seconds) of producing the token after the context ``ids`` ([1, L])."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class DecoderContender(Contender):
    """The export through StatefulDecoder (ort-cpu, ort-cuda or trt)."""

    def __init__(self, name: str, export_dir: Path, backend: str, threads: int | None, device_id: int,
                 cuda_graph: bool | None = None):
        from .decoder import StatefulDecoder

        self.name = name
        self.dec = StatefulDecoder(export_dir, backend, batch_size=1, threads=threads, device_id=device_id,
                                   cuda_graph=cuda_graph)
        if cuda_graph and not self.dec.cuda_graph:
            raise MissingRuntimeError(f"no CUDA graph: {self.dec.cuda_graph_off}")
        self.detail = self.dec.runtime_name
        self.state_bytes = self.dec.state_nbytes

    def _batch(self, n: int) -> None:
        if self.dec.batch_size != n:
            self.dec.resize(n)
        self.dec.reset()

    def prefill(self, ids):
        self._batch(ids.shape[0])
        self.dec.prefill(list(ids))

    def _greedy(self, tokens: np.ndarray) -> np.ndarray:
        if self.dec.sample_on_device:  # as generate does on a GPU: only the token ids come back
            return torch.argmax(self.dec.step_on_device(tokens), dim=-1).cpu().numpy()
        return self.dec.step(tokens).argmax(-1)

    def decode(self, first, n, warmup):
        self._batch(len(first))
        tokens = np.asarray(first, dtype=np.int64)
        for _ in range(max(warmup, 3 if self.dec.cuda_graph else 0)):  # a graph is captured at its 2nd run
            tokens = self._greedy(tokens)
        t = time.perf_counter()
        for _ in range(n):
            tokens = self._greedy(tokens)
        return (time.perf_counter() - t) / n

    def at_context(self, ids, memory):
        self._batch(1)
        logits = self.dec.prefill(list(ids))
        nxt = logits.argmax(-1)
        extra, dt, _ = memory.measure(lambda: self.dec.step(nxt))
        return extra + self.state_bytes, dt

    def close(self):
        del self.dec


class TorchContender(Contender):
    """Our GLAForCausalLM in eager mode, carrying its states (or recomputing the context)."""

    def __init__(self, name: str, model, device: torch.device, recompute: bool = False):
        self.name, self.model, self.device, self.recompute = name, model, device, recompute
        # the model's own choice on a GPU (Triton); on the CPU the chunked form for prompts and the
        # per-step recurrence for single tokens, the faster of the two for each
        self.many, self.one = ("auto", "auto") if device.type == "cuda" else ("chunk", "naive")
        self.detail = f"torch {torch.__version__}, {device}, gla ops {self.many}/{self.one}" + (
            ", full forward per token" if recompute else ""
        )

    @torch.no_grad()
    def prefill(self, ids):
        x = torch.from_numpy(ids).to(self.device)
        self.model(x, states=self.model.init_states(x.shape[0], device=self.device), gla_backend=self.many)

    @torch.no_grad()
    def decode(self, first, n, warmup):
        tok = torch.from_numpy(np.asarray(first, dtype=np.int64)).to(self.device)[:, None]
        states = self.model.init_states(tok.shape[0], device=self.device)

        def step(tok, states):
            out = self.model(tok, states=states, gla_backend=self.one)
            return out.logits[:, -1].argmax(-1, keepdim=True), out.states

        for _ in range(warmup):
            tok, states = step(tok, states)
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            tok, states = step(tok, states)
        _sync(self.device)
        return (time.perf_counter() - t) / n

    @torch.no_grad()
    def at_context(self, ids, memory):
        x = torch.from_numpy(ids).to(self.device)
        if self.recompute:
            # the next token without a state: one forward over the whole context
            extra, dt, _ = memory.measure(lambda: self.model(x, gla_backend=self.many).logits[:, -1].argmax(-1))
            return extra, dt
        out = self.model(x, states=self.model.init_states(1, device=self.device), gla_backend=self.many)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        states = out.states
        del out
        extra, dt, _ = memory.measure(lambda: self.model(nxt, states=states, gla_backend=self.one))
        return extra + _tensor_bytes(states), dt


class FlaContender(Contender):
    """flash-linear-attention's GLAForCausalLM with our weights, decoding with its cache."""

    def __init__(self, model, device: torch.device):
        import fla
        from fla.models import GLAConfig as FlaConfig
        from fla.models import GLAForCausalLM as FlaModel

        self.name, self.device = FLA, device
        cfg = FlaConfig(**{k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "model_type")})
        dtype = model.lm_head.weight.dtype
        fla_model = FlaModel(cfg)  # the same parameter names as ours (gla_export.models)
        try:
            fla_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=True)
        except RuntimeError as e:
            raise ModelError(f"fla's GLAForCausalLM does not take our weights: {first_line(e)}") from e
        fla_model = fla_model.to(device)
        self.model = fla_model.to(dtype).eval()
        self.detail = f"fla {getattr(fla, '__version__', '?')}, {device}"

    @torch.no_grad()
    def prefill(self, ids):
        self.model(input_ids=torch.from_numpy(ids).to(self.device), use_cache=True)

    @torch.no_grad()
    def decode(self, first, n, warmup):
        tok = torch.from_numpy(np.asarray(first, dtype=np.int64)).to(self.device)[:, None]
        cache = None

        def step(tok, cache):
            out = self.model(input_ids=tok, past_key_values=cache, use_cache=True)
            return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

        for _ in range(max(warmup, 1)):  # the first call creates the cache
            tok, cache = step(tok, cache)
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            tok, cache = step(tok, cache)
        _sync(self.device)
        return (time.perf_counter() - t) / n

    @torch.no_grad()
    def at_context(self, ids, memory):
        out = self.model(input_ids=torch.from_numpy(ids).to(self.device), use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = out.past_key_values
        del out
        extra, dt, _ = memory.measure(lambda: self.model(input_ids=nxt, past_key_values=cache, use_cache=True))
        return extra + _tensor_bytes(cache), dt


def _gla_run_result(export_dir: Path, settings: BenchSettings, provider: str, vocab: int) -> Result:
    """gla-run at batch 1: its own prefill and decode timings (median of the repeats)."""
    from .._runner import run_gla_run

    gen = np.random.default_rng(settings.seed)
    prompt = gen.integers(0, vocab, settings.prefill_len).tolist()
    runs = []
    for _ in range(settings.repeats):
        runs.append(
            run_gla_run(
                export_dir,
                ids=prompt,
                max_new_tokens=settings.decode_tokens + 1,
                ignore_eos=True,
                provider=provider,
                threads=settings.threads,
            )
        )
    prompt_s = statistics.median(r.timing["prompt_s"] for r in runs)
    ms = statistics.median(r.timing["ms_per_token"] for r in runs)
    res = Result(OURS_CPP, runs[0].backend)
    res.prefill[1] = {"tokens_per_s": settings.prefill_len / prompt_s, "ms": 1e3 * prompt_s}
    res.decode[1] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms}
    res.notes.append("batch 1 only; timings reported by gla-run itself (process start and loading excluded; its "
                     "prefill is the one run of the prefill session per process, so it includes that session's "
                     "first-run set-up: on CUDA, the provider's library and kernel initialisation)")
    return res


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def _load_model(meta: dict[str, Any], export_dir: Path, model: Any, device: torch.device):
    from .verify import _load_reference

    m, _ = _load_reference(meta, export_dir, model, device)
    return m


def _device_info(device: torch.device) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"kind": device.type, "torch": torch.__version__}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info.update(name=f"{name} ({os.cpu_count()} CPUs)")
    return info


def bench(
    export_dir: str | os.PathLike,
    *,
    model: Any = None,
    settings: BenchSettings | None = None,
    device: str = "auto",
    device_id: int = 0,
    contenders: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every available contender (module docstring) on the export; returns the report."""
    from ..export.metadata import open_export

    t_start = time.perf_counter()
    settings = settings or BenchSettings()
    settings.check()
    say = progress or (lambda msg: None)
    export_dir = Path(export_dir)
    meta = open_export(export_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingRuntimeError("device cuda: PyTorch sees no CUDA GPU")
    dev = torch.device("cuda", device_id) if device == "cuda" else torch.device("cpu")
    if settings.threads is not None and dev.type == "cpu":
        torch.set_num_threads(settings.threads)
    known = (OURS_ORT_CPU, OURS_ORT_CUDA, OURS_ORT_CUDA_NOGRAPH, OURS_TRT, OURS_CPP, EAGER, RECOMPUTE, FLA)
    if contenders is not None:
        bad = [c for c in contenders if c not in known]
        if bad:
            raise UsageError(f"unknown contender {bad[0]!r}: choose from {', '.join(known)}")
    wanted = lambda name: contenders is None or name in contenders  # noqa: E731

    vocab = meta.model.vocab_size
    report = BenchReport(
        str(export_dir),
        _device_info(dev),
        {
            "dtype": meta.dtype,
            "state_dtype": meta.state_dtype,
            "form": meta.form,
            "num_parameters": meta.model.num_parameters,
            "num_layers": meta.model.num_layers,
            "hidden_size": meta.model.hidden_size,
            "vocab_size": vocab,
            "weights": weights_label(meta.get("quantization")),
        },
        {
            "batches": list(settings.batches),
            "prefill_len": settings.prefill_len,
            "decode_tokens": settings.decode_tokens,
            "contexts": list(settings.contexts),
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "seed": settings.seed,
            "threads": settings.threads,
        },
    )
    rng = np.random.default_rng(settings.seed)

    # -- who runs -----------------------------------------------------------------------------------
    makers: list[tuple[str, Callable[[], Contender]]] = []
    if dev.type == "cpu":
        makers.append(
            (OURS_ORT_CPU, lambda: DecoderContender(OURS_ORT_CPU, export_dir, "ort-cpu", settings.threads, device_id))
        )
        report.skipped.setdefault(OURS_ORT_CUDA, "benchmarking on the CPU")
        report.skipped.setdefault(OURS_ORT_CUDA_NOGRAPH, "benchmarking on the CPU")
        report.skipped.setdefault(OURS_TRT, "benchmarking on the CPU")
    else:
        makers.append(
            (
                OURS_ORT_CUDA,
                lambda: DecoderContender(OURS_ORT_CUDA, export_dir, "ort-cuda", settings.threads, device_id,
                                         cuda_graph=True),
            )
        )
        makers.append(
            (
                OURS_ORT_CUDA_NOGRAPH,
                lambda: DecoderContender(OURS_ORT_CUDA_NOGRAPH, export_dir, "ort-cuda", settings.threads, device_id,
                                         cuda_graph=False),
            )
        )
        makers.append((OURS_TRT, lambda: DecoderContender(OURS_TRT, export_dir, "trt", settings.threads, device_id)))
    torch_model = None
    try:
        torch_model = _load_model(meta, export_dir, model, dev)
    except (UsageError, ModelError) as e:
        for name in (EAGER, RECOMPUTE, FLA):
            report.skipped[name] = f"no PyTorch model: {e}"
    if torch_model is not None:
        makers.append((EAGER, lambda: TorchContender(EAGER, torch_model, dev)))
        makers.append((RECOMPUTE, lambda: TorchContender(RECOMPUTE, torch_model, dev, recompute=True)))
        if dev.type != "cuda":
            report.skipped[FLA] = "benchmarking on the CPU (fla's kernels are Triton: they need a CUDA GPU)"
        else:
            import importlib.util

            if importlib.util.find_spec("fla") is None:
                report.skipped[FLA] = "flash-linear-attention is not installed"
            else:
                makers.append((FLA, lambda: FlaContender(torch_model, dev)))

    # -- measure ------------------------------------------------------------------------------------
    prompts = {b: rng.integers(0, vocab, (b, settings.prefill_len)) for b in settings.batches}
    firsts = {b: rng.integers(0, vocab, b) for b in settings.batches}
    contexts = {L: rng.integers(0, vocab, (1, L)) for L in settings.contexts}
    for name, make in makers:
        if not wanted(name) or name in report.skipped:
            if name not in report.skipped and not wanted(name):
                report.skipped[name] = "not requested"
            continue
        say(f"{name}: loading")
        try:
            c = make()
        except Exception as e:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
            report.skipped[name] = _one_line(e)
            continue
        res = Result(name, c.detail)
        try:
            if name != RECOMPUTE:
                for b in settings.batches:
                    say(f"{name}: prefill B{b}×{settings.prefill_len}")
                    s = _median_time(
                        lambda b=b, c=c: c.prefill(prompts[b]), 1 if settings.warmup else 0, settings.repeats, dev
                    )
                    res.prefill[b] = {"tokens_per_s": b * settings.prefill_len / s, "ms": 1e3 * s}
                    say(f"{name}: decode B{b}, {settings.decode_tokens} tokens")
                    per = c.decode(firsts[b], settings.decode_tokens, settings.warmup)
                    res.decode[b] = {"ms_per_token": 1e3 * per, "tokens_per_s": b / per}
            memory = _Memory(dev, torch_allocations=not isinstance(c, DecoderContender))
            for L in settings.contexts:
                say(f"{name}: next token at context {L}")
                runs = [c.at_context(contexts[L], memory) for _ in range(max(1, min(settings.repeats, 3)))]
                res.context[L] = {
                    "bytes": int(max(r[0] for r in runs)),
                    "ms_per_token": 1e3 * statistics.median(r[1] for r in runs),
                }
        except Exception as e:  # noqa: BLE001
            res.notes.append(f"stopped: {_one_line(e)}")
        finally:
            c.close()
            del c
        report.results.append(res)

    if wanted(OURS_CPP):
        from .._runner import find_gla_run

        if find_gla_run() is None:
            report.skipped[OURS_CPP] = "gla-run is not built"
        else:
            say(f"{OURS_CPP}: batch 1")
            try:
                report.results.append(
                    _gla_run_result(export_dir, settings, "cuda" if dev.type == "cuda" else "cpu", vocab)
                )
            except Exception as e:  # noqa: BLE001
                report.skipped[OURS_CPP] = _one_line(e)

    say("copy bandwidth (the floor)")
    add_floor(report, export_dir, dev)
    report.target = _target(report)
    report.seconds = time.perf_counter() - t_start
    return report


def add_floor(report: BenchReport, export_dir: Path, device: torch.device, bytes_per_s: float | None = None) -> None:
    """The floor of every batch (runtime/floor.py) beside every decode figure: ``floor_ms_per_token``
    and ``ratio_to_floor`` in each decode entry, the copy bandwidth measured here (or given)."""
    from .floor import copy_bandwidth, model_floor

    if bytes_per_s is None:
        report.copy_bandwidth = copy_bandwidth(device)
        bytes_per_s = report.copy_bandwidth["bytes_per_s"]
    else:
        report.copy_bandwidth = {"bytes_per_s": bytes_per_s, "way": "given", "ways": {}}
    batches = sorted({b for r in report.results for b in r.decode} | set(report.settings["batches"]))
    report.floor = model_floor(export_dir, batches, bytes_per_s)
    quantized = report.model.get("weights", "fp") != "fp"
    for r in report.results:
        if quantized and not r.name.startswith("ours"):
            # the PyTorch contenders run the float model (the weights dequantized): they read more
            # bytes than the export, so the export's floor is not theirs
            r.notes.append("runs the float model (weights dequantized): the quantized export's floor does not apply")
            continue
        for b, d in r.decode.items():
            f = report.floor["ms_per_token"][b]
            d["floor_ms_per_token"] = f
            d["ratio_to_floor"] = d["ms_per_token"] / f


def weights_label(q: dict[str, Any] | None) -> str:
    """``fp`` for a float export; else e.g. ``int4 b32 sym rtn (matmulnbits)`` (the metadata's quantization)."""
    if not q:
        return "fp"
    block = "per-channel" if q.get("per_channel") or q.get("block_size") is None else f"b{q['block_size']}"
    sym = "sym" if q.get("symmetric") else "asym"
    acc = f", accuracy {q['accuracy_level']}" if q.get("accuracy_level") else ""
    return f"{q['weights']} {block} {sym} {q['method']} ({q['format']}{acc})"


def _target(report: BenchReport) -> dict[str, Any]:
    """decode tokens/s at batch 1: our best against fla eager (the target is 2× on a GPU)."""
    ours = [r for r in report.results if r.name.startswith("ours") and 1 in r.decode]
    out: dict[str, Any] = {"metric": "decode tokens/s at batch 1", "target_ratio": TARGET_RATIO}
    if not ours:
        return {**out, "met": None, "why": "no measurement of ours at batch 1"}
    best = max(ours, key=lambda r: r.decode[1]["tokens_per_s"])
    out.update(ours=best.name, ours_tokens_per_s=best.decode[1]["tokens_per_s"])
    fla = report.result(FLA)
    eager = report.result(EAGER)
    if eager is not None and 1 in eager.decode:
        out["vs_pytorch_eager"] = best.decode[1]["tokens_per_s"] / eager.decode[1]["tokens_per_s"]
    if fla is None or 1 not in fla.decode:
        return {**out, "met": None, "why": report.skipped.get(FLA, "fla was not measured")}
    ratio = best.decode[1]["tokens_per_s"] / fla.decode[1]["tokens_per_s"]
    return {
        **out,
        "peer": FLA,
        "peer_tokens_per_s": fla.decode[1]["tokens_per_s"],
        "ratio": ratio,
        "met": ratio >= TARGET_RATIO,
    }


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def write_json(report: BenchReport, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report.as_dict(), indent=2) + "\n")


def write_plot(report: BenchReport, path: str | os.PathLike) -> None:
    """A PNG: decode and prefill throughput per batch, memory and latency of the next token vs context."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingRuntimeError("the plot needs matplotlib: pip install matplotlib (or gla-export[bench])") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    batches = report.settings["batches"]
    width = 0.8 / max(1, len(report.results))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {r.name: palette[i % len(palette)] for i, r in enumerate(report.results)}  # one per contender

    for ax, what, key, label in (
        (axes[0][0], "decode", "tokens_per_s", "decode tokens/s"),
        (axes[0][1], "prefill", "tokens_per_s", "prefill tokens/s"),
    ):
        for i, r in enumerate(report.results):
            table = getattr(r, what)
            xs = [j + i * width for j, b in enumerate(batches) if b in table]
            ys = [table[b][key] for b in batches if b in table]
            if ys:
                ax.bar(xs, ys, width, label=r.name, color=colour[r.name])
        ax.set_xticks([j + width * (len(report.results) - 1) / 2 for j in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(f"{label} (higher is better)")
        ax.grid(axis="y", alpha=0.3)

    for ax, key, scale, label in (
        (axes[1][0], "bytes", 2**20, "MiB beyond the weights (0 drawn at 1 KiB)"),
        (axes[1][1], "ms_per_token", 1.0, "ms"),
    ):
        for r in report.results:
            if r.context:
                Ls = sorted(r.context)
                ax.plot(
                    Ls,
                    [max(r.context[L][key] / scale, 1e-3) for L in Ls],
                    marker="o",
                    label=r.name,
                    color=colour[r.name],
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length L (tokens)")
        ax.set_ylabel(label)
        ax.set_title(("memory" if key == "bytes" else "latency") + " of the next token at context L")
        ax.grid(alpha=0.3)

    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(4, len(labels)))
    t = report.target
    ratio = f"; ours/fla decode B1 = {t['ratio']:.2f}× (target {t['target_ratio']:g}×)" if t.get("ratio") else ""
    fig.suptitle(
        f"gla-export bench: {report.device['name']}, {report.model['dtype']}, "
        f"{report.model['num_parameters'] / 1e6:.1f}M parameters{ratio}"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
