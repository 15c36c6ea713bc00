"""Run exported graphs and compare them with the PyTorch model.

Cases (all with fixed seeds, so a failure reproduces):

- ``random``: prefill of random ids (B = 2) from zero states: logits and every present state;
- ``continue``: prefill of more random ids from the states PyTorch reached in ``random``
  (non-zero past states, conv caches included);
- ``real``: prefill of an English sentence, tokenised when the model's tokenizer is known;
- ``padded``: a left-padded batch with ``attention_mask``: each row's logits and final states
  against that row run alone (only when the prefill graph has the mask);
- ``padded-continue``: the same for left-padded prompts that continue the rows of ``random``
  (the padding sits between each row's past and its new tokens; only with the mask);
- ``step``: the step graph run once per token of the ``real`` (or a random) sequence from zero
  states, reproducing the full forward's logits at every position and its final states.

An output passes when ``max|got − ref| <= atol + rtol · max|ref|``; the table also shows the
relative norm error ``‖got − ref‖ / ‖ref‖``.

Runtimes: stock ONNX Runtime (CPU) for ``decomposed`` and ``onnx`` graphs; for ``custom`` graphs
our ONNX Runtime library when it is built, else the ONNX reference evaluator with the Python
reference op. ONNX Runtime has no bfloat16 CPU kernels, so graphs with bfloat16 activations or
states run in the reference evaluator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._dtypes import to_numpy as _np
from .._dtypes import torch_dtype
from ..models.modeling import STATE_FIELDS, GLAForCausalLM, LayerState, state_tensor
from ..models.tokenizer import ByteTokenizer
from .metadata import PREFILL_FILE, STEP_FILE, ExportMetadata, StateInfo, as_metadata, zero_state_feeds

SENTENCE = "The quick brown fox jumps over the lazy dog, and the dog keeps on sleeping in the sun."

# default (atol, rtol) per activation dtype; see docs/export.md for the measured errors behind them
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
RUNTIMES = ("auto", "onnxruntime", "reference")


# ---------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------


class Runner:
    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class OrtRunner(Runner):
    def __init__(self, session, name: str):
        self.session, self.name = session, name
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds):
        return dict(zip(self.output_names, self.session.run(None, feeds)))


class ReferenceRunner(Runner):
    name = "onnx.reference + gla reference op"

    def __init__(self, path: Path):
        from .reference_op import reference_evaluator

        self.evaluator = reference_evaluator(str(path))
        self.output_names = list(self.evaluator.output_names)

    def run(self, feeds):
        return dict(zip(self.output_names, self.evaluator.run(None, feeds)))


def make_runner(path: Path, form: str, dtype: torch.dtype, runtime: str = "auto", state_dtype: torch.dtype | None = None) -> Runner:
    """A runner for one graph (see the module docstring for which runtime runs what)."""
    from ..errors import MissingRuntimeError, UsageError

    if runtime not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "reference" or torch.bfloat16 in (dtype, state_dtype):
        if runtime == "onnxruntime":
            raise UsageError("ONNX Runtime has no bfloat16 CPU kernels: validate bfloat16 exports with runtime='reference'")
        return ReferenceRunner(path)
    if form != "custom":
        from ..runtime.session import create_session

        # the one session factory (gla_export.runtime.session): the opset variable scoped to the load
        session = create_session(path, ("cpu",), library=False, allow_unreleased_opsets=form == "onnx")
        return OrtRunner(session, "onnxruntime (CPU)")
    from .._native import find_library

    lib = find_library("ort")
    if lib is None:
        if runtime == "onnxruntime":
            raise MissingRuntimeError("the gla ONNX Runtime library is not built, so custom graphs cannot run in ONNX Runtime")
        return ReferenceRunner(path)
    from ..runtime import create_session

    return OrtRunner(create_session(str(path), providers=("cpu",), library=lib), "onnxruntime (CPU) + libgla_onnxruntime")


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


@dataclass
class Check:
    case: str
    output: str
    max_abs: float
    rel: float
    ref_max: float
    limit: float
    ok: bool
    allowance: float = 0.0  # BASELINE_FACTOR x PyTorch's own error in the export's dtype (0: none)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ValidationReport:
    atol: float
    rtol: float
    checks: list[Check] = field(default_factory=list)
    runtimes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary_rows(self) -> list[Check]:
        """One row per case and output kind: the worst layer's state stands for all layers."""
        rows: dict[tuple[str, str], Check] = {}
        for c in self.checks:
            kind = c.output.split(".")[-1] if c.output.startswith("present.") else c.output
            key = (c.case, kind)
            if key not in rows or (c.max_abs - c.limit) > (rows[key].max_abs - rows[key].limit):
                rows[key] = c
        return list(rows.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "runtimes": self.runtimes,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "checks": [c.as_dict() for c in self.checks],
        }


def compare(case: str, output: str, got: np.ndarray, ref: torch.Tensor, atol: float, rtol: float, allowance: float = 0.0) -> Check:
    """``max|got − ref| <= max(atol + rtol·max|ref|, allowance)``."""
    g = torch.from_numpy(np.asarray(got).astype(np.float64))
    r = ref.detach().double().cpu()
    if tuple(g.shape) != tuple(r.shape):
        return Check(case, f"{output} (shape {list(g.shape)} != {list(r.shape)})", float("inf"), float("inf"), 0.0, 0.0, False, allowance)
    ref_max = r.abs().max().item() if r.numel() else 0.0
    if not torch.isfinite(g).all():
        return Check(case, output, float("inf"), float("inf"), ref_max, max(atol + rtol * ref_max, allowance), False, allowance)
    diff = g - r
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel = (diff.norm() / max(r.norm().item(), 1e-12)).item()
    limit = max(atol + rtol * ref_max, allowance)
    return Check(case, output, max_abs, rel, ref_max, limit, max_abs <= limit, allowance)


# ---------------------------------------------------------------------------------------------
# cases: inputs and the PyTorch references
# ---------------------------------------------------------------------------------------------




@dataclass
class Case:
    name: str
    graph: str  # "prefill" or "step"
    feeds: list[dict[str, np.ndarray]]  # one per run (several for the step case)
    expected: dict[str, torch.Tensor]
    collect: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]
    allowance: dict[str, float] = field(default_factory=dict)  # limit from PyTorch's own low-precision error


def _state_feeds(states: list[LayerState], state_names: Sequence[StateInfo]) -> dict[str, np.ndarray]:
    """The graph's past-state inputs, each in its dtype from the metadata."""
    return {st.input: _np(state_tensor(states, st.layer, st.kind).to(torch_dtype(st.dtype))) for st in state_names}


def _rounded(states: list[LayerState], state_names: Sequence[StateInfo]) -> list[LayerState]:
    """States rounded to the graph's dtypes (and back), so that PyTorch and the graph continue
    from the very same values."""
    dtypes = {(st.layer, STATE_FIELDS[st.kind]): torch_dtype(st.dtype) for st in state_names}
    out = []
    for i, s in enumerate(states):
        fields = {}
        for f in ("recurrent", "conv", "key", "value"):
            t = getattr(s, f)
            fields[f] = None if t is None else t.to(dtypes[(i, f)]).to(t.dtype)
        out.append(LayerState(**fields, position=s.position))  # int64: nothing to round
    return out


def _cast_states(states: list[LayerState], sd: torch.dtype, act: torch.dtype, r: int | None = None) -> list[LayerState]:
    """``states`` (or their row r) with the recurrent state in ``sd`` and the caches in ``act``."""
    def cut(t, dtype=None):
        if t is None:
            return None
        t = t if r is None else t[r:r + 1]
        return t if dtype is None else t.to(dtype)

    return [LayerState(cut(s.recurrent, sd), cut(s.conv, act), cut(s.key, act), cut(s.value, act), cut(s.position))
            for s in states]


def _state_outputs(states: list[LayerState], state_names: Sequence[StateInfo], row: slice | int | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for st in state_names:
        t = state_tensor(states, st.layer, st.kind)
        out[st.output] = t if row is None else t[row]
    return out


def _stack_rows(alone: list[dict[str, torch.Tensor]], state_names: Sequence[StateInfo]) -> dict[str, torch.Tensor]:
    """Rows run alone as one padded batch's results: logits one row after the other; a growing
    KV cache left-padded with zeros to the batch's length (the padded slots the graph zeroes)."""
    growing = {st.output for st in state_names if st.grows}
    out = {}
    for k in alone[0]:
        if k == "logits":
            out[k] = torch.cat([a[k][0] for a in alone])
        elif k in growing:
            n = max(a[k].shape[2] for a in alone)
            out[k] = torch.cat([F.pad(a[k], (0, 0, n - a[k].shape[2], 0)) for a in alone])
        else:
            out[k] = torch.cat([a[k] for a in alone])
    return out


def encode_sentence(meta: ExportMetadata | dict[str, Any], source: Path | None) -> list[int] | None:
    """Token ids of :data:`SENTENCE` with the model's tokenizer, or None when it is unknown."""
    meta = as_metadata(meta)
    tok = meta.tokenizer
    if tok["kind"] == "byte":
        return ByteTokenizer(tok["bos_token_id"], tok["eos_token_id"]).encode(SENTENCE)
    if tok["kind"] == "huggingface" and source is not None and (source / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            return None
        ids = Tokenizer.from_file(str(source / "tokenizer.json")).encode(SENTENCE).ids
        vocab = meta.model.vocab_size
        return ids if ids and max(ids) < vocab else None
    return None


BASELINE_FACTOR = 3.0  # a low-precision graph may be this much further off than PyTorch in that dtype


@torch.no_grad()
def build_cases(
    reference: GLAForCausalLM,
    meta: ExportMetadata | dict[str, Any],
    source: Path | None,
    *,
    baseline: GLAForCausalLM | None = None,
    seed: int = 0,
) -> tuple[list[Case], list[str]]:
    """The validation cases with their PyTorch results (computed now, so the models can be
    released before the graphs are loaded).

    ``reference`` runs the exported weights in float32 (for fp16/bf16 exports: the rounded
    weights, upcast) with float32 states: PyTorch's own fp16 arithmetic is no better a reference
    than the graph's (on a 24-layer model it is 4x further from float64 than our fp16 graph).
    ``baseline`` is the model in the export's dtype, run with states in the export's state dtype:
    its error against the reference, per output,
    is what the graph is allowed too (times :data:`BASELINE_FACTOR`) when that is more than the
    fixed tolerance — "no worse than PyTorch in this dtype".
    """
    c = reference.config
    meta = as_metadata(meta)
    states_meta = meta.states
    has_mask = meta.has_attention_mask
    gen = torch.Generator().manual_seed(seed)
    big = meta.model.num_parameters > 50_000_000
    T = 21 if big else 67  # 67 crosses a 64-step chunk boundary of the decomposed form
    notes: list[str] = []
    graph_state_dtype = torch_dtype(meta.state_dtype)

    # forwards from zero states by (model, state dtype, ids): "random" and "real"/"step" are each asked for twice
    from_zero: dict[tuple[int, torch.dtype, int], tuple[torch.Tensor, Any]] = {}

    def fwd(model, sd, ids, mask=None, states=None):
        """The model with states of dtype ``sd`` (float32 for the reference, the graph's for the baseline)."""
        if states is not None or mask is not None:
            return model(ids, attention_mask=mask, states=states, gla_backend="chunk")
        key = (id(model), sd, id(ids))  # the entry keeps `ids` alive, so its id is not reused
        if key not in from_zero:
            from_zero[key] = (ids, model(ids, states=model.init_states(ids.shape[0], state_dtype=sd), gla_backend="chunk"))
        return from_zero[key][1]

    def left_pad(lens):
        """Random rows of the given lengths, left-padded into one batch: (ids, mask, rows)."""
        width = max(lens)
        pid = torch.zeros(len(lens), width, dtype=torch.long)
        pmask = torch.zeros(len(lens), width, dtype=torch.long)
        rows = [torch.randint(0, c.vocab_size, (n,), generator=gen) for n in lens]
        for r, row in enumerate(rows):
            pid[r, width - len(row):] = row
            pmask[r, width - len(row):] = 1
        return pid, pmask, rows

    def results(out) -> dict[str, torch.Tensor]:
        return {"logits": out.logits.float(), **{k: v.float() for k, v in _state_outputs(out.states, states_meta).items()}}

    def prefill_feeds(ids, states=None, mask=None):
        states = states if states is not None else reference.init_states(ids.shape[0])
        feeds = {"input_ids": ids.numpy()}
        if has_mask:
            feeds["attention_mask"] = (torch.ones_like(ids) if mask is None else mask).numpy()
        feeds.update(_state_feeds(states, states_meta))
        return feeds

    def last_run(runs):
        return runs[-1]  # prefill cases run once

    # (name, graph, feeds, compute(model) -> results, collect)
    specs: list[tuple] = []
    ids = torch.randint(0, c.vocab_size, (2, T), generator=gen)
    specs.append(("random", "prefill", [prefill_feeds(ids)], lambda m, sd: results(fwd(m, sd, ids)), last_run))

    # the past of "continue" is the reference's state after "random", rounded to the graph's dtypes
    past = _rounded(fwd(reference, torch.float32, ids).states, states_meta)
    ids2 = torch.randint(0, c.vocab_size, (2, 13), generator=gen)

    def cont(m, sd):
        p = _cast_states(past, sd, m.lm_head.weight.dtype)
        return results(fwd(m, sd, ids2, states=p))

    specs.append(("continue", "prefill", [prefill_feeds(ids2, past)], cont, last_run))

    real = encode_sentence(meta, source)
    if real is None:
        notes.append("real: no tokenizer for this model, the step case runs on random ids")
        seq = torch.randint(0, c.vocab_size, (1, 16 if big else 24), generator=gen)
    else:
        seq = torch.tensor([real[: 24 if big else 96]])
        specs.append(("real", "prefill", [prefill_feeds(seq)], lambda m, sd: results(fwd(m, sd, seq)), last_run))

    if has_mask:
        lens = [min(T, 23), min(T, 23) - 9]
        Tp = max(lens)
        pid, pmask, rows = left_pad(lens)

        def padded(m, sd, rows=rows):
            alone = [results(fwd(m, sd, row[None])) for row in rows]
            # logits: the real positions of every row one after the other; states: one row each
            return _stack_rows(alone, states_meta)

        def padded_collect(runs, lens=lens, Tp=Tp):
            o = dict(runs[-1])
            o["logits"] = np.concatenate([o["logits"][r, Tp - n:] for r, n in enumerate(lens)])
            return o

        specs.append(("padded", "prefill", [prefill_feeds(pid, mask=pmask)], padded, padded_collect))

        # the rows of "random" continued by left-padded prompts of different lengths: the padding
        # sits between each row's past (its convolution cache) and its new tokens
        clens = [9, 2]
        Tc = max(clens)
        cid, cmask, crows = left_pad(clens)

        def padded_continue(m, sd, rows=crows):
            alone = []
            for r, row in enumerate(rows):
                p = _cast_states(past, sd, m.lm_head.weight.dtype, r)
                alone.append(results(fwd(m, sd, row[None], states=p)))
            return _stack_rows(alone, states_meta)

        specs.append(("padded-continue", "prefill", [prefill_feeds(cid, past, mask=cmask)], padded_continue,
                      lambda runs, lens=clens, Tp=Tc: padded_collect(runs, lens, Tp)))

    def step_collect(runs):
        return {**runs[-1], "logits": np.concatenate([r["logits"] for r in runs], axis=1)}

    step_feeds = [{"input_ids": seq[:, t: t + 1].numpy()} for t in range(seq.shape[1])]
    specs.append(("step", "step", step_feeds, lambda m, sd: results(fwd(m, sd, seq)), step_collect))

    cases = []
    for name, graph, feeds, compute, collect in specs:
        expected = compute(reference, torch.float32)
        allowance = {}
        if baseline is not None:
            got = compute(baseline, graph_state_dtype)
            allowance = {k: BASELINE_FACTOR * (got[k] - v).abs().max().item() for k, v in expected.items()}
        cases.append(Case(name, graph, feeds, expected, collect, allowance))
    return cases, notes


def run_cases(
    out_dir: Path,
    cases: list[Case],
    meta: ExportMetadata | dict[str, Any],
    *,
    atol: float,
    rtol: float,
    runtime: str = "auto",
    notes: list[str] | None = None,
) -> ValidationReport:
    """Load each graph once, run its cases, compare. States of the step case are threaded from
    one run to the next."""
    t0 = time.perf_counter()
    report = ValidationReport(atol=atol, rtol=rtol, notes=list(notes or []))
    meta = as_metadata(meta)
    form = meta.form
    dtype = torch_dtype(meta.dtype)
    states_meta = meta.states
    zeros = zero_state_feeds(meta, 1)  # a growing KV cache starts empty (its symbolic sequence axis 0)
    for graph, file in (("prefill", PREFILL_FILE), ("step", STEP_FILE)):
        runner = make_runner(out_dir / file, form, dtype, runtime, torch_dtype(meta.state_dtype))
        report.runtimes[graph] = runner.name
        for case in (c for c in cases if c.graph == graph):
            runs = []
            if graph == "step":
                states = dict(zeros)
                for feeds in case.feeds:
                    res = runner.run({**feeds, **states})
                    runs.append(res)
                    states = {st.input: res[st.output] for st in states_meta}
            else:
                runs = [runner.run(f) for f in case.feeds]
            got = case.collect(runs)
            for name, ref in case.expected.items():
                report.checks.append(compare(case.name, name, got[name], ref, atol, rtol, case.allowance.get(name, 0.0)))
        del runner
    report.seconds = time.perf_counter() - t0
    return report
