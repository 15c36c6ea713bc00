"""What quantized weights cost: an export against a float reference (another export or the PyTorch
model), on held-out text.

- logits error: max |Δ| and relative norm of the logits over the text (teacher-forced, state carried);
- bits per byte of the text (the model's cross-entropy, in bits, per UTF-8 byte of the text);
- greedy agreement: how many of the first ``n`` greedily decoded tokens equal the reference's
  (both decode their own continuation, through the stateful decoder), and where they first differ.

The sample model's held-out text ships as tests/data/kjv_heldout_excerpt.txt (books never trained
on); calibration uses other text (quantize.DEFAULT_CALIBRATION).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.modeling import GLAForCausalLM
from .metadata import open_export, zero_state_feeds

README_PROMPT = "In the beginning"


def _ids(meta: dict[str, Any], export_dir: Path | None, text: str, add_bos: bool = True) -> list[int]:
    kind = meta.get("tokenizer", {}).get("kind")
    if kind in ("byte", "huggingface") and export_dir is not None:
        from ..runtime.tokenizers import load_tokenizer

        return list(load_tokenizer(export_dir, meta).encode(text, add_bos=add_bos))
    vocab = meta["model"]["vocab_size"]  # no tokenizer (random-weight models): bytes folded into the vocabulary
    return [b % vocab for b in text.encode("utf-8")]


class _ExportLM:
    """Teacher-forced logits of an export's prefill graph over a long text, chunk by chunk (ORT CPU)."""

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        self.meta = open_export(self.dir)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        path = self.dir / self.meta["files"]["prefill"]
        if self.meta["gla_op"]["form"] == "custom":
            from ..runtime.session import create_session

            self.session = create_session(path, ("cpu",), so)
        else:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def logits(self, ids: list[int], chunk: int = 512) -> np.ndarray:
        states = zero_state_feeds(self.meta, 1)
        outs = []
        names = ["logits"] + [st["output"] for st in self.meta["states"]]
        for i in range(0, len(ids), chunk):
            x = np.asarray([ids[i:i + chunk]], np.int64)
            feeds = {"input_ids": x, **states}
            if "attention_mask" in self.inputs:
                feeds["attention_mask"] = np.ones_like(x)
            res = self.session.run(names, feeds)
            outs.append(res[0][0])
            states = {st["input"]: r for st, r in zip(self.meta["states"], res[1:])}
        return np.concatenate(outs, 0)


class _TorchLM:
    def __init__(self, model: GLAForCausalLM):
        self.model = model.float().eval()

    @torch.no_grad()
    def logits(self, ids: list[int], chunk: int = 512) -> np.ndarray:
        states, outs = None, []
        for i in range(0, len(ids), chunk):
            out = self.model(torch.tensor([ids[i:i + chunk]]), states=states)
            states = out.states
            outs.append(out.logits[0].float().numpy())
        return np.concatenate(outs, 0)


def bits_per_byte(logits: np.ndarray, ids: list[int], n_bytes: int) -> float:
    """Cross-entropy of ``ids[1:]`` under ``logits[:-1]`` in bits, per byte of text."""
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(x - m).sum(-1))
    nll = logz - x[np.arange(len(x)), ids[1:]]
    return float(nll.sum() / math.log(2) / n_bytes)


@dataclass
class QualityReport:
    text_bytes: int
    bits_per_byte: float
    reference_bits_per_byte: float
    logits_max_abs: float
    logits_rel: float
    top1_agreement: float  # teacher-forced: the argmax of the logits equal, over the text
    greedy_tokens: int
    greedy_agree: int  # leading greedy tokens equal to the reference's
    greedy_match_fraction: float  # position-wise equal tokens over the whole generation
    prompt: str

    @property
    def bpb_increase(self) -> float:
        return self.bits_per_byte / self.reference_bits_per_byte - 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits_per_byte_increase": self.bpb_increase}

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("bits per byte", f"{self.bits_per_byte:.4f} (reference {self.reference_bits_per_byte:.4f}, {100 * self.bpb_increase:+.2f} %)"),
            ("logits error", f"max |Δ| {self.logits_max_abs:.3g}, rel. norm {self.logits_rel:.3g} over {self.text_bytes} bytes"),
            ("teacher-forced top-1 agreement", f"{100 * self.top1_agreement:.2f} %"),
            ("greedy tokens equal", f"first {self.greedy_agree} of {self.greedy_tokens} ({100 * self.greedy_match_fraction:.1f} % position-wise), prompt {self.prompt!r}"),
        ]


def greedy_tokens(export_dir: str | os.PathLike | None, prompt_ids: list[int], n: int, model: GLAForCausalLM | None = None) -> list[int]:
    """``n`` greedy tokens after ``prompt_ids``: the stateful decoder on ORT CPU, or PyTorch."""
    if model is not None:
        out, states = [], None
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            for _ in range(n):
                r = model(ids, states=states)
                states = r.states
                tok = int(r.logits[0, -1].argmax())
                out.append(tok)
                ids = torch.tensor([[tok]])
        return out
    from ..runtime.decoder import StatefulDecoder

    dec = StatefulDecoder(export_dir, "ort-cpu")
    logits = dec.prefill([prompt_ids])
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits[0]))
        out.append(tok)
        logits = dec.step([tok])
    return out


def compare(
    export_dir: str | os.PathLike,
    reference: str | os.PathLike | GLAForCausalLM,
    text: str,
    *,
    prompt: str = README_PROMPT,
    greedy: int = 512,
    max_bytes: int | None = None,
    cache: dict | None = None,
) -> QualityReport:
    """An export (typically quantized) against ``reference``: a float export directory or the model.
    ``cache``: a dict kept between calls with the same reference, text and prompt (its results are
    computed once)."""
    cache = {} if cache is None else cache
    export_dir = Path(export_dir)
    lm = _ExportLM(export_dir)
    meta = lm.meta
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    ids = _ids(meta, export_dir, text)
    n_bytes = len(text.encode("utf-8"))
    got = lm.logits(ids)
    if "logits" not in cache:
        ref_lm = _TorchLM(reference) if isinstance(reference, GLAForCausalLM) else _ExportLM(reference)
        cache["logits"] = ref_lm.logits(ids)
    ref = cache["logits"]
    diff = got.astype(np.float64) - ref
    prompt_ids = _ids(meta, export_dir, prompt)
    toks = greedy_tokens(export_dir, prompt_ids, greedy)
    if "tokens" not in cache:
        cache["tokens"] = greedy_tokens(None if isinstance(reference, GLAForCausalLM) else reference, prompt_ids, greedy,
                                        model=reference if isinstance(reference, GLAForCausalLM) else None)
    ref_toks = cache["tokens"]
    lead = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), len(toks))
    return QualityReport(
        text_bytes=n_bytes,
        bits_per_byte=bits_per_byte(got, ids, n_bytes),
        reference_bits_per_byte=bits_per_byte(ref, ids, n_bytes),
        logits_max_abs=float(np.abs(diff).max()),
        logits_rel=float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        top1_agreement=float(np.mean(got.argmax(-1) == ref.argmax(-1))),
        greedy_tokens=greedy,
        greedy_agree=lead,
        greedy_match_fraction=float(np.mean(np.asarray(toks) == np.asarray(ref_toks))),
        prompt=prompt,
    )


def heldout_text() -> str:
    """The sample model's held-out excerpt that ships with the repository (tests/data)."""
    path = Path(__file__).resolve().parents[2] / "tests" / "data" / "kjv_heldout_excerpt.txt"
    return path.read_text(encoding="utf-8")


def report_for_verify(export_dir: str | os.PathLike, meta: dict[str, Any], greedy: int = 512) -> QualityReport | None:
    """For ``verify``: a quantized export against its source model in PyTorch (float32), on the
    held-out excerpt; None for a float export or when the source model is not at hand."""
    if not meta.get("quantization"):
        return None
    source = meta.get("source")
    if not source or not Path(source).exists():
        return None
    from ..models.loader import load_model

    path = Path(source)
    model = load_model(path).float().eval()
    return compare(export_dir, model, heldout_text(), greedy=greedy)
