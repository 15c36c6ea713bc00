"""``gla-export verify``: the PyTorch model against every runtime that can run the export.

Built on Polygraphy: every backend is a Polygraphy runner and every comparison is Polygraphy's
``Comparator.compare_accuracy`` with its ``SimpleCompareFunc``. Tolerances are per activation
dtype; by default an element passes when ``|got − ref| <= atol + rtol · max|ref|`` over that
output (the rule of the export's own validation, handed to Polygraphy as a per-output ``atol``),
or ``check_error_stat`` picks one of Polygraphy's own statistics.

- reference: the PyTorch model (the checkpoint the export recorded, or ``model=``) behind
  Polygraphy's ``PytRunner``, with each graph's inputs and outputs;
- ``ort-cpu`` / ``ort-cuda``: Polygraphy's ``OnnxrtRunner`` over a session with our custom-op
  library registered (custom exports) and the CPU or the CUDA execution provider;
- ``trt``: Polygraphy's ``TrtRunner`` over the engines of ``gla-export build`` with our plugin
  registered (``IPluginRegistry.load_library``; needs the ``tensorrt`` package and a GPU).

Cases, each compared on the logits and every layer's state:

- ``prefill``: prefill.onnx on a random batch from zero states, then more tokens from the states
  PyTorch reached (non-zero past states);
- ``step``: step.onnx once per generated token, each time fed PyTorch's state (one step's error);
- ``decode``: prefill then step after step, each backend carrying *its own* states forward, as a
  deployed decoder does (errors accumulate; compared at every step).

The ``prefill`` and ``step`` cases run through ``Comparator.run``; their inputs and the PyTorch
outputs can be saved (``save_dir``) in Polygraphy's JSON format, so that ``polygraphy run`` can
replay them (docs/verify-bench.md has the command lines). Polygraphy cannot thread outputs back
into inputs, so the ``decode`` case calls the same runners' ``infer`` in a loop and hands the
results to ``compare_accuracy``.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .._dtypes import torch_dtype
from ..errors import MissingRuntimeError, ModelError, UsageError, ValidationError

if TYPE_CHECKING:
    from ..export.metadata import ExportMetadata, StateInfo

from .engines import RUNTIMES  # noqa: E402 - the runtimes verify compares with PyTorch

CASES = ("prefill", "step", "decode")
# "scaled" (default): every element within atol + rtol · max|reference| of its output, the rule of
# the export's own validation; Polygraphy gets it as a per-output atol (its elemwise check then
# passes exactly those elements). The others are Polygraphy's statistics with atol/rtol as given.
ERROR_STATS = ("scaled", "elemwise", "max", "mean", "median")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One case × backend × output kind; the worst layer and iteration stand for all."""

    case: str
    backend: str
    output: str
    iterations: int
    max_abs: float
    max_rel: float
    mean_abs: float
    passed: bool
    worst: str  # which tensor (and iteration) had the largest error
    limit: float = float("nan")  # the absolute tolerance of that tensor

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BackendStatus:
    name: str
    available: bool
    detail: str  # what runs it, or why it was skipped
    error: str | None = None  # it was available but failed to run


@dataclass
class VerifyReport:
    export_dir: str
    dtype: str
    atol: float
    rtol: float
    check_error_stat: str
    reference: str
    backends: list[BackendStatus] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    polygraphy_commands: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ran(self) -> list[str]:
        return [b.name for b in self.backends if b.available and b.error is None]

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    @property
    def errors(self) -> list[BackendStatus]:
        return [b for b in self.backends if b.error is not None]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.failures and not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "export_dir": self.export_dir,
            "dtype": self.dtype,
            "atol": self.atol,
            "rtol": self.rtol,
            "check_error_stat": self.check_error_stat,
            "reference": self.reference,
            "backends": [b.__dict__ for b in self.backends],
            "rows": [r.as_dict() for r in self.rows],
            "polygraphy_commands": self.polygraphy_commands,
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------

from .._dtypes import to_numpy as _to_numpy  # noqa: E402


def _to_torch(a: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------


class GraphModule(torch.nn.Module):
    """The PyTorch model with one exported graph's signature: named inputs (ids, mask, past states)
    in, ``(logits, *present states)`` out in the order of the graph's outputs."""

    def __init__(self, model, meta: ExportMetadata, graph: str):
        super().__init__()
        self.model, self.graph = model, graph
        self.states = meta.states
        self.input_names = meta.graphs[graph].input_names
        self.output_names = meta.graphs[graph].output_names
        self.layers = meta.model.num_layers

    def forward(self, **feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from ..models.modeling import layer_states, state_tensor

        states = layer_states(self.layers, [(st.layer, st.kind, feeds[st.input]) for st in self.states])
        # the plain PyTorch form of the op (as the export's own validation): no Triton kernel, and so
        # no TF32 products on a GPU, in the reference
        out = self.model(
            feeds["input_ids"], attention_mask=feeds.get("attention_mask"), states=states, gla_backend="chunk"
        )
        present = {}
        for st in self.states:
            present[st.output] = state_tensor(out.states, st.layer, st.kind)
        return tuple(out.logits.float() if name == "logits" else present[name] for name in self.output_names)


def _torch_runner(model, meta: ExportMetadata, graph: str, device):
    """Polygraphy's PytRunner for one graph, on ``device`` (PytRunner itself always moves inputs
    to CUDA and feeds them by position)."""
    from polygraphy.backend.pyt import PytRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    module = GraphModule(model, meta, graph)
    input_meta = TensorMetadata()
    dtypes = {}
    for io in meta.graphs[graph].inputs:
        dtypes[io.name] = torch_dtype(io.dtype)
        input_meta.add(
            io.name,
            dtype=DataType.from_dtype(dtypes[io.name], "torch"),
            shape=[d if isinstance(d, int) else -1 for d in io.shape],
        )

    class TorchRunner(PytRunner):
        def infer_impl(self, feed_dict):
            with torch.no_grad():
                feeds = {n: _to_torch(feed_dict[n], dtypes[n], device) for n in module.input_names if n in feed_dict}
                start = time.time()
                outputs = self.model(**feeds)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                end = time.time()
            out = OrderedDict()
            for name, t in zip(module.output_names, outputs, strict=True):
                # bfloat16 has no numpy type Polygraphy compares; float32 holds it exactly
                out[name] = (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
            self.inference_time = end - start
            return out

    # a loader, not the module: PytRunner calls whatever callable it is given (and a module is one)
    return TorchRunner(lambda: module, input_meta, module.output_names, name=f"pytorch-{graph}")


def _load_once(load):
    """``load``, called on the first call only: Polygraphy's OnnxrtRunner and TrtRunner call their loader on
    every activation (each ``Comparator.run``, each ``with runner``), and verify activates a graph's runner
    once per case; with this the session or engine is built once and the activations share it."""
    loaded = []

    def once():
        if not loaded:
            loaded.append(load())
        return loaded[0]

    return once


def _ort_session_loader(meta: ExportMetadata, graph: str, cuda: bool, device_id: int):
    """A loader for Polygraphy's OnnxrtRunner: the decoder's own session (engines.ort.open_session,
    through the one session factory, with the same checks)."""

    def load():
        from .engines.ort import open_session

        return open_session(meta, graph, cuda=cuda, device_id=device_id)

    return load


def _trt_runner(engine: Path, plugin: str | None, name: str):
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    def load():
        if plugin is not None:
            import tensorrt as trt

            from .engines.trt import load_plugin

            load_plugin(trt, plugin)
        return EngineFromPath(str(engine))()

    return TrtRunner(_load_once(load), name=name)


def _backend_status(
    name: str, meta: ExportMetadata, engines_dir: Path | None, plugin: str | None
) -> tuple[BackendStatus, dict[str, Any]]:
    """Whether a runtime can run the export here (the runtime adapters' own check), and what it needs to."""
    from .engines import check_runtime

    options: dict[str, Any] = {}
    if name == "trt":
        # Polygraphy's TrtRunner drives the `tensorrt` package (TensorRT-RTX engines need a GPU it supports)
        options = {"engines_dir": engines_dir, "plugin": plugin, "module": "tensorrt"}
    try:
        detail = check_runtime(name, meta, **options)
    except (MissingRuntimeError, UsageError) as e:
        return BackendStatus(name, False, str(e)), {}
    if name != "trt":
        return BackendStatus(name, True, detail), {}
    from .engines.trt import engines_dir_of, plugin_for
    from .tensorrt import ENGINE_FILES

    edir = engines_dir_of(meta, engines_dir)
    return BackendStatus(name, True, detail), {
        "engines": {g: edir / f for g, f in ENGINE_FILES.items()},
        "plugin": plugin_for(meta, plugin),
    }


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    prefill: list[dict[str, np.ndarray]]  # the prefill case: zero states, then a continuation
    step: list[dict[str, np.ndarray]]  # the step case: one token each, PyTorch's state before it
    tokens: np.ndarray  # [B, steps]: the tokens every backend is fed in the decode case


@torch.no_grad()
def _make_inputs(model, meta: ExportMetadata, batch: int, prompt_len: int, steps: int, seed: int, device) -> _Inputs:
    from ..models.modeling import LayerState, state_tensor

    gen = torch.Generator().manual_seed(seed)
    vocab = meta.model.vocab_size
    states_meta = meta.states
    state_dtype = torch_dtype(meta.state_dtype)
    has_mask = meta.has_attention_mask

    def feeds(ids: torch.Tensor, states: list[LayerState]) -> dict[str, np.ndarray]:
        f = {"input_ids": ids.numpy()}
        if has_mask and ids.shape[1] > 1:
            f["attention_mask"] = np.ones(tuple(ids.shape), dtype=np.int64)
        for st in states_meta:
            f[st.input] = _to_numpy(state_tensor(states, st.layer, st.kind))
        return f

    def run(ids, states):
        return model(ids.to(device), states=states, gla_backend="chunk")

    zeros = model.init_states(batch, device=device, state_dtype=state_dtype)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen)
    more = torch.randint(0, vocab, (batch, 13), generator=gen)
    out = run(ids, zeros)
    prefill = [feeds(ids, zeros), feeds(more, out.states)]

    step, tokens = [], []
    states = out.states
    tok = out.logits[:, -1].float().argmax(-1, keepdim=True).cpu()
    for _ in range(steps):
        step.append(feeds(tok, states))
        tokens.append(tok)
        o = run(tok, states)
        states = o.states
        tok = o.logits[:, -1].float().argmax(-1, keepdim=True).cpu()
    return _Inputs(prefill, step, torch.cat(tokens, dim=1).numpy() if tokens else np.zeros((batch, 0), np.int64))


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------


def _output_kind(name: str) -> str:
    return name.split(".")[-1] if name.startswith("present.") else name


def _rows(case: str, accuracy, backend_names: dict[str, str], limits: dict[str, float]) -> list[Row]:
    """Collapse Polygraphy's per-iteration, per-output results into one row per backend and output kind."""
    rows: dict[tuple[str, str], Row] = {}
    for result in accuracy:
        for (r0, _ref), iterations in result.items():
            backend = backend_names[r0]
            for it, outputs in enumerate(iterations):
                for name, res in outputs.items():
                    kind = _output_kind(name)
                    key = (backend, kind)
                    where = f"{name} (iteration {it})"
                    row = rows.get(key)
                    if row is None:
                        rows[key] = Row(
                            case,
                            backend,
                            kind,
                            1,
                            res.max_absdiff,
                            res.max_reldiff,
                            res.mean_absdiff,
                            bool(res),
                            where,
                            limits[name],
                        )
                        continue
                    row.iterations = max(row.iterations, it + 1)
                    if res.max_absdiff > row.max_abs:
                        row.max_abs, row.worst, row.limit = res.max_absdiff, where, limits[name]
                    row.max_rel = max(row.max_rel, res.max_reldiff)
                    row.mean_abs = max(row.mean_abs, res.mean_absdiff)
                    row.passed = row.passed and bool(res)
    order = {"logits": 0, "recurrent_state": 1, "conv_state": 2}
    return sorted(rows.values(), key=lambda r: (r.backend, order.get(r.output, 9), r.output))


def _decode_loop(
    prefill_runner, step_runner, first: dict[str, np.ndarray], tokens: np.ndarray, states_meta: Sequence[StateInfo]
) -> list:
    """Prefill then step, carrying this runner's own states; returns one IterationResult per call."""
    from polygraphy.comparator.struct import IterationResult

    results = []
    with prefill_runner as pre:
        out = pre.infer(feed_dict=dict(first))
        results.append(
            IterationResult(
                outputs={k: np.array(v) for k, v in out.items()},
                runtime=pre.last_inference_time(),
                runner_name=pre.name,
            )
        )
    states = {st.input: np.array(out[st.output]) for st in states_meta}
    with step_runner as step:
        for t in range(tokens.shape[1]):
            out = step.infer(feed_dict={"input_ids": np.ascontiguousarray(tokens[:, t : t + 1]), **states})
            results.append(
                IterationResult(
                    outputs={k: np.array(v) for k, v in out.items()},
                    runtime=step.last_inference_time(),
                    runner_name=step.name,
                )
            )
            states = {st.input: np.array(out[st.output]) for st in states_meta}
    return results


POLYGRAPHY_HINT = "pip install 'gla-export[verify]'"


def _require_polygraphy() -> None:
    """MissingRuntimeError (exit 5) with the install command when Polygraphy is not installed (the
    README's quick start installs ``.[cpu]`` only)."""
    try:
        import polygraphy  # noqa: F401
        from polygraphy.comparator import Comparator  # noqa: F401
    except ImportError as e:
        raise MissingRuntimeError(
            f"gla-export verify needs Polygraphy, which is not installed: {POLYGRAPHY_HINT}") from e


def _quiet_polygraphy(verbose: bool) -> None:
    from polygraphy.logger import G_LOGGER

    # failures are in the report's table; Polygraphy's own per-output lines only with --verbose
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def _load_reference(meta: ExportMetadata, export_dir: Path, model: Any, device):
    from ..models.config import ConfigError
    from ..models.loader import CheckpointError, load_model
    from ..models.modeling import GLAForCausalLM

    dtype = torch_dtype(meta.dtype)
    if isinstance(model, GLAForCausalLM):
        return model.to(device=device).eval(), "the given GLAForCausalLM"
    if model is None:
        source = meta.source
        if not source:
            raise UsageError(
                f"{export_dir} does not record the checkpoint it was exported from: pass the model (--model DIR)"
            )
        path = Path(source)
        if not path.is_absolute() and not path.exists() and (export_dir / source).exists():
            path = export_dir / source
    else:
        path = Path(model)
    if not path.exists():
        raise ModelError(f"checkpoint not found: {path} (pass the model with --model DIR)")
    try:
        m = load_model(path, dtype=dtype)
    except (CheckpointError, ConfigError) as e:
        raise ModelError(str(e)) from e
    if m.config.vocab_size != meta.model.vocab_size or m.config.num_hidden_layers != meta.model.num_layers:
        raise ModelError(f"the checkpoint {path} is not the model of this export (vocabulary or layer count differ)")
    if meta.get("quantization"):  # quantized weights: compare with their dequantized values (quality: export/quality.py)
        from ..export.quantize import dequantized_reference

        return dequantized_reference(m, meta).to(device).eval(), f"{path} (weights dequantized as the export quantized them)"
    return m.to(device).eval(), str(path)


def verify(
    export_dir: str | os.PathLike,
    *,
    model: Any = None,
    backends: Sequence[str] | None = None,
    batch: int = 2,
    prompt_len: int = 65,
    steps: int = 8,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    check_error_stat: str = "scaled",
    engines_dir: str | os.PathLike | None = None,
    trt_plugin: str | None = None,
    device: str = "auto",
    device_id: int = 0,
    save_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    progress=None,
) -> VerifyReport:
    """Compare the export, run by every available backend, with the PyTorch model.

    Args:
        export_dir: an export directory (``gla-export export``).
        model: the checkpoint (or a GLAForCausalLM); default: the one the export recorded.
        backends: some of :data:`RUNTIMES`; None runs every available one and reports the others as
            skipped. A requested backend that is not available raises MissingRuntimeError.
        batch, prompt_len, steps: the shape of the prefill batch and the number of decode steps.
        atol, rtol: defaults per dtype (:data:`gla_export.export.DEFAULT_TOLERANCES`, the export's own); ``check_error_stat``: ``scaled`` (the
            export validation's rule, see the module docstring) or one of Polygraphy's statistics.
        device: where PyTorch runs (``auto``: CUDA when available).
        save_dir: write the ``prefill``/``step`` inputs and PyTorch outputs as Polygraphy JSON there,
            with the equivalent ``polygraphy run`` commands in ``polygraphy_run.sh``.
        progress: a callable taking one line of progress text, or None.

    Returns the report; it does not raise on a mismatch (the CLI turns ``not report.passed`` into
    a ValidationError, exit code 4).
    """
    from ..export.metadata import open_export

    t_start = time.perf_counter()
    say = progress or (lambda msg: None)
    export_dir = Path(export_dir)
    meta = open_export(export_dir)
    if check_error_stat not in ERROR_STATS:
        raise UsageError(f"check_error_stat must be one of {', '.join(ERROR_STATS)}, got {check_error_stat!r}")
    for name, value, lo in (("batch", batch, 1), ("prompt_len", prompt_len, 1), ("steps", steps, 1)):
        if not isinstance(value, int) or value < lo:
            raise UsageError(f"{name} must be an integer >= {lo}, got {value!r}")
    if backends is not None:
        bad = [b for b in backends if b not in RUNTIMES]
        if bad:
            raise UsageError(f"unknown backend {bad[0]!r}: choose from {', '.join(RUNTIMES)}")
    from ..export.validate import DEFAULT_TOLERANCES

    d_atol, d_rtol = DEFAULT_TOLERANCES[torch_dtype(meta.dtype)]
    if meta.get("quantization"):  # the per-format tolerance of quantized weights (export/quantize.py)
        q = meta["quantization"]["validation_tolerance"]
        d_atol, d_rtol = max(d_atol, q["atol"]), max(d_rtol, q["rtol"])
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):  # NaN fails every comparison
        raise UsageError(f"atol and rtol must be >= 0 and finite, got atol={atol}, rtol={rtol}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingRuntimeError("device cuda: PyTorch sees no CUDA GPU")
    dev = torch.device(device, device_id) if device == "cuda" else torch.device("cpu")

    _require_polygraphy()
    _quiet_polygraphy(verbose)
    from .engines.base import check_graph_files

    check_graph_files(meta)  # a graph file replaced by another: ModelError (exit 3), not a failed backend

    # which backends run
    statuses, needs = [], {}
    engines_path = Path(engines_dir) if engines_dir is not None else None
    for name in backends or RUNTIMES:
        st, need = _backend_status(name, meta, engines_path, trt_plugin)
        if backends is not None and not st.available:
            raise MissingRuntimeError(f"backend {name} is not available: {st.detail}")
        statuses.append(st)
        needs[name] = need
    if not any(s.available for s in statuses):
        raise MissingRuntimeError(
            "no backend can run this export here: " + "; ".join(f"{s.name}: {s.detail}" for s in statuses)
        )

    say(f"loading the PyTorch model on {dev}")
    torch_model, reference = _load_reference(meta, export_dir, model, dev)
    report = VerifyReport(
        str(export_dir),
        meta.dtype,
        atol,
        rtol,
        check_error_stat,
        f"PyTorch ({reference}, {dev})",
        backends=statuses,
        settings=dict(batch=batch, prompt_len=prompt_len, steps=steps, seed=seed, device=str(dev)),
    )
    say("computing the inputs")
    inputs = _make_inputs(torch_model, meta, batch, prompt_len, steps, seed, dev)

    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # Polygraphy before 0.50
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple  # noqa: N806

    def compare_func(reference: list) -> tuple[Any, dict[str, float]]:
        """Polygraphy's compare function for one case, and the absolute tolerance of each output."""
        names = list(reference[0].keys())
        if check_error_stat != "scaled":
            return SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat=check_error_stat), dict.fromkeys(
                names, atol
            )
        peak = {
            n: max(float(np.max(np.abs(np.asarray(it[n], dtype=np.float64)), initial=0.0)) for it in reference)
            for n in names
        }
        limits = {n: atol + rtol * peak[n] for n in names}
        return SimpleCompareFunc(atol=limits, rtol=rtol, check_error_stat="elemwise"), limits

    def make_runner(status: BackendStatus, graph: str):
        if status.name in ("ort-cpu", "ort-cuda"):
            loader = _ort_session_loader(meta, graph, status.name == "ort-cuda", device_id)
            return OnnxrtRunner(_load_once(loader), name=f"{status.name}-{graph}")
        need = needs[status.name]
        return _trt_runner(need["engines"][graph], need["plugin"], name=f"trt-{graph}")

    from polygraphy.comparator.struct import RunResults

    # the PyTorch reference of every case first, then one backend at a time through all three cases: a
    # backend's runners (one per graph) load their session or engine once (_load_once) and serve every
    # case, and are dropped before the next backend's load (one backend's sessions in memory at a time)
    saved, cases = {}, []
    for case, graph, feeds in (("prefill", "prefill", inputs.prefill), ("step", "step", inputs.step)):
        ref_runner = _torch_runner(torch_model, meta, graph, dev)
        say(f"{case}: PyTorch")
        ref = Comparator.run([ref_runner], data_loader=feeds)
        func, limits = compare_func(ref[ref_runner.name])
        saved[graph] = (feeds, ref, ref_runner.name, limits)
        cases.append((case, graph, feeds, ref, ref_runner.name, func, limits))
    # decode: each backend carries its own states
    say("decode: PyTorch")
    ref_iters = _decode_loop(
        _torch_runner(torch_model, meta, "prefill", dev),
        _torch_runner(torch_model, meta, "step", dev),
        inputs.prefill[0],
        inputs.tokens,
        meta.states,
    )
    decode_func, decode_limits = compare_func(ref_iters)

    rows: dict[str, list[Row]] = {case: [] for case in CASES}
    for st in statuses:
        if not st.available or st.error is not None:
            continue
        runners = {graph: make_runner(st, graph) for graph in ("prefill", "step")}
        # Comparator.run runs its runners one after the other anyway; one call per backend lets a
        # backend that fails be reported without losing the others
        for case, graph, feeds, ref, ref_name, func, limits in cases:
            runner = runners[graph]
            say(f"{case}: {st.name}")
            try:
                got = Comparator.run([runner], data_loader=feeds)
            except Exception as e:  # noqa: BLE001 - a backend that fails is a finding, not a crash
                st.error = _one_line(e)
                break
            pair = RunResults([(runner.name, got[runner.name]), (ref_name, ref[ref_name])])
            accuracy = Comparator.compare_accuracy(pair, comparisons=[(0, 1)], compare_func=func)
            rows[case] += _rows(case, accuracy, {runner.name: st.name}, limits)
        if st.error is not None:
            continue
        say(f"decode: {st.name}, prefill then step on its own states")
        try:
            iters = _decode_loop(runners["prefill"], runners["step"], inputs.prefill[0], inputs.tokens, meta.states)
        except Exception as e:  # noqa: BLE001
            st.error = _one_line(e)
            continue
        run_results = RunResults([(f"{st.name}-decode", iters), ("pytorch-decode", ref_iters)])
        accuracy = Comparator.compare_accuracy(run_results, comparisons=[(0, 1)], compare_func=decode_func)
        rows["decode"] += _rows("decode", accuracy, {f"{st.name}-decode": st.name}, decode_limits)
    report.rows = [row for case in CASES for row in rows[case]]

    if save_dir is not None:
        report.polygraphy_commands = _save_for_polygraphy(
            Path(save_dir), export_dir, saved, meta, statuses, needs, atol, rtol, check_error_stat
        )
    report.seconds = time.perf_counter() - t_start
    return report


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _save_for_polygraphy(
    save_dir: Path, export_dir: Path, saved: dict, meta: ExportMetadata, statuses, needs, atol, rtol, stat
) -> list[str]:
    """The prefill/step inputs and PyTorch outputs as Polygraphy JSON, and the polygraphy run commands
    that replay them."""
    from polygraphy.comparator.struct import RunResults
    from polygraphy.json import save_json

    save_dir.mkdir(parents=True, exist_ok=True)
    commands = []
    form = meta.form
    for graph, (feeds, results, ref_name, limits) in saved.items():
        if stat == "scaled":  # polygraphy's per-output form: --atol NAME:VALUE ...
            per_output = " ".join(f"{n}:{v:.6g}" for n, v in limits.items())
            tol = f"--atol {per_output} --rtol {rtol:g} --check-error-stat elemwise"
        else:
            tol = f"--atol {atol:g} --rtol {rtol:g} --check-error-stat {stat}"
        inputs_file, outputs_file = save_dir / f"{graph}.inputs.json", save_dir / f"{graph}.pytorch.json"
        save_json(feeds, str(inputs_file))
        RunResults([(ref_name, results[ref_name])]).save(str(outputs_file))
        io = f"--load-inputs {shlex.quote(str(inputs_file))} --load-outputs {shlex.quote(str(outputs_file))} {tol}"
        onnx_file = shlex.quote(str(meta.path(graph)))
        if form == "onnx":
            commands.append(f"ALLOW_RELEASED_ONNX_OPSET_ONLY=0 polygraphy run {onnx_file} --onnxrt {io}")
        elif form == "decomposed":
            commands.append(f"polygraphy run {onnx_file} --onnxrt {io}")
        else:
            commands.append(
                f"# {graph}: polygraphy's CLI cannot register an ONNX Runtime custom-op library "
                f"(NVIDIA/TensorRT#4487): gla-export verify runs its OnnxrtRunner from Python instead"
            )
        trt = next((s for s in statuses if s.name == "trt" and s.available), None)
        if trt is not None:
            need = needs["trt"]
            engine = f"polygraphy run {shlex.quote(str(need['engines'][graph]))} --model-type engine --trt {io}"
            if need.get("plugin"):
                # polygraphy's --plugins only dlopens a library (ctypes.CDLL), which registers nothing
                # from an IPluginV3 library that hands its creators over through getCreators
                commands.append(
                    f"# {graph}: `{engine} --plugins LIB` would not find our creators (polygraphy's --plugins only "
                    "dlopens; libgla_tensorrt registers through IPluginRegistry::loadLibrary): gla-export verify "
                    "loads the plugin with tensorrt.get_plugin_registry().load_library and runs TrtRunner from Python"
                )
            else:
                commands.append(engine)
    script = save_dir / "polygraphy_run.sh"
    script.write_text(
        "#!/usr/bin/env bash\n# written by gla-export verify: replays its prefill and step comparisons\nset -e\n"
        + "\n".join(commands)
        + "\n"
    )
    script.chmod(0o755)
    return commands


def raise_if_failed(report: VerifyReport) -> None:
    """ValidationError (exit code 4) naming the worst failure, when the report did not pass."""
    if report.passed:
        return
    parts = []
    if report.failures:
        worst = max(report.failures, key=lambda r: r.max_abs)
        parts.append(
            f"{len(report.failures)} of {len(report.rows)} comparisons exceed the tolerance (worst: {worst.case} "
            f"{worst.backend} {worst.worst}: max|err| {worst.max_abs:.3e}, atol {report.atol:g}, rtol {report.rtol:g})"
        )
    for b in report.errors:
        parts.append(f"{b.name} failed to run: {b.error}")
    raise ValidationError("verify failed: " + "; ".join(parts))
