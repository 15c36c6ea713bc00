"""Weight-only int8/int4 quantization of an export: one quantization of each weight, shared by the
prefill and step graphs through the one external weights file (docs/export.md, "Quantized weights").

The float graphs are built as usual (model_graph.py); :func:`quantize_export` then quantizes the
weight table and rewrites the nodes that read the quantized weights, in both graphs alike:

- ``MatMul(x, W)`` → ``com.microsoft::MatMulNBits`` (format ``matmulnbits``: ONNX Runtime CPU and
  CUDA) or ``DequantizeLinear(Wq, scale[, zero], axis=0, block_size)`` → ``MatMul`` (format ``qdq``:
  standard ONNX, opset 21, the pattern TensorRT turns into weight-only quantized GEMMs);
- the logits' ``Gemm(x, E, transB=1)`` over the ``[V, H]`` table: ``MatMulNBits`` reads that
  layout as it is (``N = V``, blocks along ``H``); ``qdq`` dequantizes along axis 1;
- the embedding ``Gather`` → ``com.microsoft::GatherBlockQuantized`` (``matmulnbits`` only). With
  tied embeddings the table and the logits' weight are the same bytes of the weights file, named
  twice (once per shape the two ops want).

Kept in float: norms, the short convolutions, the gate's bias and its ``logsigmoid / normalizer``
path, the recurrent state; the gate's two low-rank projections only when ``quantize_gate``
(docs/benchmarks.md has the numbers behind the default).

The arithmetic comes from ONNX Runtime's ``onnxruntime.quantization`` where it has it:
round-to-nearest is its C++ ``quantize_matmul_4bits``/``quantize_matmul_8bits`` (the kernels of
``MatMulNBitsQuantizer``'s default algorithm), HQQ is its ``HQQWeightOnlyQuantizer.quantize_internal``.
GPTQ is written here: ONNX Runtime's (from Intel Neural Compressor) returns only the dequantized
weights and re-quantizes them with a fresh min/max, which moves them off the grid GPTQ chose; it
also needs the calibration inputs of every MatMul from ONNX graphs, where we have the PyTorch model.
AWQ is written here too (ONNX Runtime has it only through NVIDIA ModelOpt, on one ONNX graph at a
time: docs/edge.md): per input channel scales searched on the calibration statistics GPTQ uses,
folded into the op before each quantized matrix, then round to nearest.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .._dtypes import torch_dtype
from ..errors import UsageError
from ..models.modeling import GLAForCausalLM
from .graph import GraphBuilder, Weight, WeightTable

BITS = {"int8": 8, "int4": 4}
FORMATS = ("matmulnbits", "qdq")
METHODS = ("rtn", "hqq", "gptq", "awq")
BLOCK_SIZES = (16, 32, 64, 128, 256)
# int8's default block (int4's is QuantConfig's 32): measured on the sample model with the default
# accuracy_level 4 (docs/edge.md, "Choosing the int8 default"), block 128 keeps fp32's first 64
# greedy tokens of the README prompt where 32 and 64 flip a near-tie at token 52, agrees with fp32
# as often as 32 over 25 held-out prompts, decodes as fast on the CPU and makes a smaller file
# (0.508x the fp16 file of the 1.3B shape against 0.532x)
DEFAULT_INT8_BLOCK = 128
MS_DOMAIN = "com.microsoft"
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "assets" / "sample-model" / "calibration.txt"

# validation of a quantized export compares its graphs with the PyTorch model whose quantized weights
# are replaced by their dequantized values: what remains is the kernels' arithmetic. With float
# activations (accuracy_level 0) that is float rounding, and the check is tight: it proves the packing
# and the wiring. With accuracy_level 4, MatMulNBits on the CPU quantizes the activations to int8 per
# block for its dot products; on the sample model that moves single logits by up to ~8 (of ~20) at
# the most sensitive positions although bits per byte moves by < 0.1 % (docs/benchmarks.md), so its
# max-error check is loose and the quality report (quality.py) is the measure. ONNX Runtime's CPU
# optimizer fuses DequantizeLinear→MatMul into MatMulNBits with its session default accuracy level 4
# (session.qdq_matmulnbits_accuracy_level), so the qdq form runs there as accuracy 4 does; TensorRT
# runs it weight-only. (atol, rtol) per format and accuracy level, measured in tests/quant.
TOLERANCES: dict[str, tuple[float, float]] = {
    "matmulnbits": (2e-3, 2e-3),
    "matmulnbits-accuracy4": (2.0, 0.5),
    "qdq": (2.0, 0.5),
}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how (``gla-export export --weights int8|int4 ...``).

    ``block_size``: elements along the input dimension that share one scale (and zero point);
    ``None`` means per output channel (int8 only). :func:`quant_config` defaults int8 to
    :data:`DEFAULT_INT8_BLOCK` (128) and int4 to 32. ``accuracy_level`` is MatMulNBits' attribute
    (4: int8 dot products on the CPU; 0: none written). The calibration text feeds GPTQ; by default
    a slice of the sample model's training text that ships with the package (never the held-out
    books, on which quality is measured).
    """

    weights: str = "int4"
    block_size: int | None = 32
    symmetric: bool = True
    format: str = "matmulnbits"
    method: str = "rtn"
    quantize_gate: bool = False
    quantize_lm_head: bool = True
    quantize_embedding: bool = True
    accuracy_level: int = 4
    calibration: str | None = None
    calibration_tokens: int = 4096
    gptq_damp: float = 0.01

    @property
    def bits(self) -> int:
        return BITS[self.weights]

    def validated(self) -> QuantConfig:
        if self.weights not in BITS:
            raise UsageError(f"weights must be fp, int8 or int4, got {self.weights!r}")
        if self.format not in FORMATS:
            raise UsageError(f"quant format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.method not in METHODS:
            raise UsageError(f"quant method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.block_size is None:
            if self.bits != 8:
                raise UsageError("per-channel scales (no block size) are for int8 only: int4 needs --block-size 16..256")
            if self.format != "qdq":
                raise UsageError("per-channel scales need --quant-format qdq (MatMulNBits blocks are 16..256 wide)")
        elif self.block_size not in BLOCK_SIZES:
            raise UsageError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))} (or per-channel for int8), got {self.block_size!r}")
        if self.method == "hqq":
            if self.symmetric:
                raise UsageError("hqq fits a float zero point per block: use it with --asymmetric")
            if self.format == "qdq":
                raise UsageError("hqq's float zero points do not fit DequantizeLinear (integer zero points): use rtn or gptq with --quant-format qdq")
            if self.block_size is None:
                raise UsageError("hqq needs a block size")
            if self.bits != 4:
                raise UsageError("hqq is for int4 (ONNX Runtime's CPU MatMulNBits takes float zero points only with 4 bits)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"accuracy level must be 0..4, got {self.accuracy_level!r}")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise UsageError(f"calibration text not found: {self.calibration}")
        if self.calibration_tokens < 16:
            raise UsageError(f"calibration_tokens must be >= 16, got {self.calibration_tokens}")
        return self

    def tolerance_key(self) -> str:
        if self.format == "qdq":
            return "qdq"
        return "matmulnbits-accuracy4" if self.accuracy_level == 4 else "matmulnbits"


def quant_config(weights: Any = "fp", **options: Any) -> QuantConfig | None:
    """``None`` for ``weights="fp"``; else a validated :class:`QuantConfig` (``weights`` may be one)."""
    if isinstance(weights, QuantConfig):
        return replace(weights, **options).validated() if options else weights.validated()
    if weights in (None, "fp", "float"):
        if any(v is not None for v in options.values()):
            named = ", ".join(k for k, v in options.items() if v is not None)
            raise UsageError(f"{named} only apply to quantized weights (--weights int8 or int4)")
        return None
    if weights not in BITS:
        raise UsageError(f"weights must be fp, int8 or int4, got {weights!r}")
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("block_size") == 0 or options.get("block_size") == "per-channel":
        options["block_size"] = None
    if weights == "int8" and "block_size" not in options:
        options["block_size"] = DEFAULT_INT8_BLOCK
    return QuantConfig(weights=weights, **options).validated()


# ---------------------------------------------------------------------------------------------
# one quantized matrix
# ---------------------------------------------------------------------------------------------


@dataclass
class QTensor:
    """A weight ``[N, K]`` (output rows; blocks run along K): ``w ≈ (codes − zero) · scale`` per block.

    ``codes`` are unsigned (0 .. 2^bits − 1); a symmetric tensor has no ``zero`` (it is 2^(bits−1),
    the default zero point of MatMulNBits and GatherBlockQuantized). ``zero`` is uint8 (integer
    zero points) or float32 (HQQ).
    """

    codes: np.ndarray  # [N, K] uint8
    scales: np.ndarray  # [N, kb] float32
    zero: np.ndarray | None  # [N, kb] uint8 or float32, None when symmetric
    bits: int
    block_size: int  # the MatMulNBits block (a power of two >= 16; >= K when per channel)
    per_channel: bool = False
    method: str = "rtn"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def k_blocks(self) -> int:
        return self.scales.shape[1]

    def zero_values(self) -> np.ndarray:
        if self.zero is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), np.float32)
        return self.zero.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """``[N, K]`` float32."""
        n, k = self.shape
        bs = self.block_size if not self.per_channel else k
        kb = self.k_blocks
        pad = kb * bs - k
        codes = np.pad(self.codes, ((0, 0), (0, pad))) if pad else self.codes
        c = codes.reshape(n, kb, bs).astype(np.float32)
        w = (c - self.zero_values()[:, :, None]) * self.scales[:, :, None]
        return w.reshape(n, kb * bs)[:, :k]


def _next_pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Low nibble first (the order of MatMulNBits, GatherBlockQuantized and ONNX int4)."""
    flat = packed.reshape(packed.shape[0], -1)
    out = np.empty((flat.shape[0], flat.shape[1] * 2), np.uint8)
    out[:, 0::2] = flat & 0x0F
    out[:, 1::2] = flat >> 4
    return out[:, :count]


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """``[R, C]`` codes 0..15 → ``[R, ceil(C/2)]`` bytes, low nibble first."""
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    c = codes.astype(np.uint8)
    return (c[:, 0::2] & 0x0F) | ((c[:, 1::2] & 0x0F) << 4)


def _rtn_positive(w: np.ndarray, bits: int, block_size: int | None, symmetric: bool) -> QTensor:
    """Round to nearest with positive scales (:func:`_grid`), per block or per row."""
    n, k = w.shape
    per_channel = block_size is None
    bs = _next_pow2(k) if per_channel else block_size
    group = k if per_channel else bs
    kb = (k + group - 1) // group
    wt = torch.from_numpy(np.ascontiguousarray(w, np.float32))
    wt = torch.nn.functional.pad(wt, (0, kb * group - k)).reshape(n * kb, group)
    scale, zero = _grid(wt, bits, symmetric)
    codes = torch.clamp(torch.round(wt / scale[:, None]) + zero[:, None], 0, (1 << bits) - 1).to(torch.uint8)
    codes = codes.reshape(n, kb * group)[:, :k]
    return QTensor(codes.contiguous().numpy(), scale.reshape(n, kb).numpy(),
                   None if symmetric else zero.reshape(n, kb).numpy().astype(np.uint8), bits, bs, per_channel, "rtn")


def quantize_rtn(w: np.ndarray | None, bits: int, block_size: int | None, symmetric: bool, positive_scales: bool = False,
                 w_kn: np.ndarray | None = None) -> QTensor:
    """Round to nearest (``w``: ``[N, K]``) with ONNX Runtime's C++ block quantizer. Its symmetric
    scales are signed (the larger-magnitude end of each block maps to −2^(b−1)); TensorRT takes
    only positive scales, so ``positive_scales`` (and per-row scales, past its 256-wide blocks)
    use :func:`_rtn_positive`. ``w_kn``: the same weight given as ``[K, N]`` (contiguous) instead of ``w``."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if w is None:
        k, n = w_kn.shape
    else:
        n, k = w.shape
    per_channel = block_size is None
    if per_channel or (symmetric and positive_scales):
        return _rtn_positive(w, bits, block_size, symmetric)
    bs = block_size
    kb = (k + bs - 1) // bs
    wt = w_kn if w_kn is not None else np.ascontiguousarray(w.T, dtype=np.float32)  # [K, N], as MatMul reads it
    pad = kb * bs - k
    if pad:
        wt = np.pad(wt, ((0, pad), (0, 0)))
    kpack = 8 // bits
    packed = np.zeros((n, kb, bs // kpack), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, (kb + kpack - 1) // kpack), np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, wt, scales, zp, bs, n, kb * bs, symmetric)
    if bits == 4:
        codes = _unpack_nibbles(packed, kb * bs)[:, :k]
        zero = None if symmetric else _unpack_nibbles(zp, kb)
    else:
        codes = packed.reshape(n, kb * bs)[:, :k]
        zero = None if symmetric else zp[:, :kb]
    return QTensor(np.ascontiguousarray(codes), scales, zero, bits, bs, per_channel, "rtn")


def quantize_hqq(w: np.ndarray, bits: int, block_size: int) -> QTensor:
    """Half-quadratic quantization (ONNX Runtime's implementation): float zero point per block."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer
    except ImportError as e:
        from ..errors import MissingRuntimeError

        raise MissingRuntimeError(f"--quant-method hqq needs ONNX Runtime's quantization tools ({e}): pip install 'gla-export[quant]'") from e

    q = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    n, k = w.shape
    w_q, scale, zero = q.quantize_internal(torch.from_numpy(np.ascontiguousarray(w, np.float32)), bits=bits, group_size=block_size)
    kb = (k + block_size - 1) // block_size
    codes = w_q.reshape(n, -1)[:, :k].numpy().astype(np.uint8)
    return QTensor(np.ascontiguousarray(codes), scale.reshape(n, kb).numpy().astype(np.float32),
                   zero.reshape(n, kb).numpy().astype(np.float32), bits, block_size, False, "hqq")


def _grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer) zero point per row of ``w`` ``[N, g]``, min/max style (0 inside the range)."""
    maxq = (1 << bits) - 1
    if symmetric:  # 2·amax over all 2^b − 1 steps (GPTQ's rule): positive scales (TensorRT), every code used;
        # +amax rounds to the top code, half a step below it
        amax = w.abs().amax(1).clamp_min(1e-12)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    lo = w.amin(1).clamp_max(0)
    hi = w.amax(1).clamp_min(0)
    scale = ((hi - lo) / maxq).clamp_min(1e-12)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_gptq(w: np.ndarray, hessian: torch.Tensor, bits: int, block_size: int | None, symmetric: bool,
                  damp: float = 0.01, lazy_block: int = 128) -> QTensor:
    """GPTQ (Frantar et al. 2023): columns quantized in order, each one's error spread over the
    columns not yet quantized through the inverse Hessian of the layer's calibration inputs.
    Scales are fitted per block when its first column is reached (on the updated weights)."""
    n, k = w.shape
    per_channel = block_size is None
    group = k if per_channel else block_size
    bs = _next_pow2(k) if per_channel else block_size
    kb = (k + bs - 1) // bs
    maxq = (1 << bits) - 1
    W = torch.from_numpy(np.array(w, np.float32, copy=True))
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)
    codes = torch.zeros((n, k), dtype=torch.uint8)
    scales = torch.zeros((n, kb), dtype=torch.float32)
    zeros = torch.zeros((n, kb), dtype=torch.float32)
    lazy = max(lazy_block, group) if not per_channel else lazy_block
    if not per_channel:
        lazy = (lazy // group) * group
    scale = zero = None
    if per_channel:
        scale, zero = _grid(W, bits, symmetric)
        scales[:, 0], zeros[:, 0] = scale, zero
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not per_channel and col % group == 0:
                scale, zero = _grid(W1[:, i:i + group], bits, symmetric)
                scales[:, col // group], zeros[:, col // group] = scale, zero
            wcol = W1[:, i]
            q = torch.clamp(torch.round(wcol / scale) + zero, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (wcol - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    zero_out = None if symmetric else zeros.numpy().astype(np.uint8)
    return QTensor(codes.numpy(), scales.numpy(), zero_out, bits, bs, per_channel, "gptq")


# ---------------------------------------------------------------------------------------------
# encodings of a QTensor as ONNX initializers
# ---------------------------------------------------------------------------------------------


def matmulnbits_arrays(qt: QTensor, scale_dtype) -> dict[str, np.ndarray]:
    """B ``[N, kb, blob]`` uint8, scales ``[N, kb]``, zero points (packed uint8, or float for HQQ)."""
    n, k = qt.shape
    kb, bs = qt.k_blocks, qt.block_size
    pad_value = 1 << (qt.bits - 1) if qt.zero is None else 0
    codes = np.pad(qt.codes, ((0, 0), (0, kb * bs - k)), constant_values=pad_value) if kb * bs > k else qt.codes
    b = _pack_nibbles(codes).reshape(n, kb, bs // 2) if qt.bits == 4 else codes.reshape(n, kb, bs)
    out = {"B": np.ascontiguousarray(b), "scales": qt.scales.astype(scale_dtype)}
    if qt.zero is not None:
        if qt.zero.dtype == np.uint8:
            out["zero_points"] = _pack_nibbles(qt.zero) if qt.bits == 4 else qt.zero.copy()
        else:
            out["zero_points"] = qt.zero.astype(scale_dtype)
    return out


def qdq_arrays(qt: QTensor, scale_dtype, transpose: bool) -> dict[str, Any]:
    """DequantizeLinear's inputs. ``transpose``: the weight as MatMul reads it (``[K, N]``, blocks
    along axis 0); else ``[N, K]`` with blocks along axis 1 (the logits' ``Gemm(transB=1)``).
    Symmetric: signed codes and no zero point (what TensorRT accepts)."""
    signed = qt.zero is None
    half = 1 << (qt.bits - 1)
    data = qt.codes.astype(np.int16) - half if signed else qt.codes
    scales, zero = qt.scales, qt.zero
    if transpose:
        data, scales = data.T, scales.T
        zero = zero.T if zero is not None else None
    if qt.per_channel:
        scales = scales.reshape(-1)
        zero = zero.reshape(-1) if zero is not None else None
    if qt.bits == 4:
        elem = TensorProto.INT4 if signed else TensorProto.UINT4
        raw = _pack_nibbles(np.ascontiguousarray(data).reshape(1, -1).astype(np.uint8) & 0x0F).reshape(-1)
        zraw = None if zero is None else _pack_nibbles(np.ascontiguousarray(zero).reshape(1, -1)).reshape(-1)
    else:
        elem = TensorProto.INT8 if signed else TensorProto.UINT8
        raw = np.ascontiguousarray(data).astype(np.int8 if signed else np.uint8).view(np.uint8).reshape(-1)
        zraw = None if zero is None else np.ascontiguousarray(zero).astype(np.uint8).reshape(-1)
    return {"data": (raw, tuple(data.shape), elem), "scales": np.ascontiguousarray(scales).astype(scale_dtype),
            "zero_point": None if zero is None else (zraw, tuple(zero.shape), elem)}


def gather_arrays(qt: QTensor, scale_dtype) -> dict[str, np.ndarray]:
    """GatherBlockQuantized's data (uint8, 4-bit pairs packed) ``[V, H/2]``, scales ``[V, kb]``,
    zero points: the same bytes as :func:`matmulnbits_arrays` of the same tensor, in 2-D."""
    m = matmulnbits_arrays(qt, scale_dtype)
    n = qt.shape[0]
    return {"data": m["B"].reshape(n, -1), "scales": m["scales"], **({"zero_points": m["zero_points"]} if "zero_points" in m else {})}


# ---------------------------------------------------------------------------------------------
# the weight table of a quantized export
# ---------------------------------------------------------------------------------------------


@dataclass
class QWeight(Weight):
    """A weight whose ONNX type and dims differ from its storage (packed int4, uint8 bytes)."""

    elem_type: int = TensorProto.UINT8
    dims: tuple[int, ...] = ()


@dataclass
class QuantWeightTable(WeightTable):
    """:class:`WeightTable` with packed quantized tensors and aliases (one stored tensor named twice)."""

    aliases: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)

    def add_packed(self, name: str, raw: np.ndarray, dims: Sequence[int], elem_type: int) -> str:
        raw = np.ascontiguousarray(raw)
        storage = torch.from_numpy(raw.view(np.uint8).reshape(-1).copy())
        self.weights[name] = QWeight(name, tuple(storage.shape), torch.uint8, lambda s=storage: s, elem_type=elem_type,
                                     dims=tuple(int(d) for d in dims))
        return name

    def add_array(self, name: str, arr: np.ndarray) -> str:
        t = torch.from_numpy(np.ascontiguousarray(arr).copy())
        if t.dtype == torch.uint8:
            return self.add_packed(name, arr, arr.shape, TensorProto.UINT8)
        self.add(name, tuple(t.shape), t.dtype, lambda t=t: t)
        return name

    def add_alias(self, name: str, target: str, dims: Sequence[int]) -> str:
        self.aliases[name] = (target, tuple(int(d) for d in dims))
        return name

    def tensor_proto(self, name: str) -> TensorProto:
        if name in self.aliases:
            target, dims = self.aliases[name]
            t = self.tensor_proto(target)
            t.name = name
            del t.dims[:]
            t.dims.extend(dims)
            return t
        w = self.weights[name]
        if not isinstance(w, QWeight):
            return super().tensor_proto(name)
        return self._external_proto(name, w.elem_type, w.dims, w)


# ---------------------------------------------------------------------------------------------
# calibration (GPTQ): the Gram matrix of each quantized matrix's inputs
# ---------------------------------------------------------------------------------------------


def calibration_ids(text: str, config, tokens: int) -> list[list[int]]:
    """The calibration text as sequences of at most 512 ids (byte-level ids for the byte vocabulary;
    else the UTF-8 bytes folded into the vocabulary: enough for random-weight models)."""
    data = text.encode("utf-8")[: tokens]
    ids = [b % config.vocab_size for b in data]
    seq = 512
    return [ids[i:i + seq] for i in range(0, len(ids), seq) if len(ids[i:i + seq]) >= 16]


@torch.no_grad()
def collect_hessians(model: GLAForCausalLM, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """``{table weight name: X^T X / n}`` over the calibration inputs of each linear layer (float32 model)."""
    c = model.config
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for i, layer in enumerate(model.model.layers):
        p, a = f"model.layers.{i}", layer.attn
        if c.attention_spec(i) is None:  # a GLA layer (a hybrid's attention layers keep q/k/v in float)
            hooks.append(a.q_proj.register_forward_pre_hook(hook(f"{p}.attn.in_proj.weight")))
            hooks.append(a.gk_proj[1].register_forward_pre_hook(hook(f"{p}.attn.gk_proj.1.weight")))
        hooks.append(a.o_proj.register_forward_pre_hook(hook(f"{p}.attn.o_proj.weight")))
        hooks.append(layer.mlp.gate_proj.register_forward_pre_hook(hook(f"{p}.mlp.gate_up_proj.weight")))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook(f"{p}.mlp.down_proj.weight")))
    head = "model.embeddings.weight" if c.tie_word_embeddings else "lm_head.weight"
    hooks.append(model.lm_head.register_forward_pre_hook(hook(head)))
    was_training = model.training
    model.eval()
    try:
        for seq in sequences:
            model(torch.tensor([seq], dtype=torch.long))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {k: (g / counts[k]).to(torch.float32) for k, g in grams.items()}


# ---------------------------------------------------------------------------------------------
# AWQ: activation-aware scales per input channel, folded into the op before
# ---------------------------------------------------------------------------------------------


def _fake_quant(w: torch.Tensor, bits: int, block_size: int | None, symmetric: bool, signed_scales: bool = False
                ) -> torch.Tensor:
    """``w`` ``[N, K]`` quantized to nearest per block and dequantized, on the grid of the quantizer
    that runs afterwards: ONNX Runtime's symmetric one (``signed_scales``: the block's largest-
    magnitude value maps to −2^(b−1), :func:`quantize_rtn`) or :func:`_grid`'s."""
    n, k = w.shape
    group = k if block_size is None else block_size
    kb = -(-k // group)
    wp = torch.nn.functional.pad(w, (0, kb * group - k)).reshape(n * kb, group)
    if signed_scales:
        half = 1 << (bits - 1)
        peak = wp.gather(1, wp.abs().argmax(1, keepdim=True))[:, 0]
        scale = torch.where(peak == 0, torch.ones_like(peak), peak / -half)
        # ONNX Runtime's arithmetic, step for step: times the reciprocal scale, plus the zero point,
        # rounded half away from zero (roundf); dividing or rounding half to even differs on ties
        x = wp * (1.0 / scale)[:, None] + half
        t = torch.trunc(x)
        q = torch.clamp(t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x)), 0, (1 << bits) - 1)
        return ((q - half) * scale[:, None]).reshape(n, kb * group)[:, :k]
    scale, zero = _grid(wp, bits, symmetric)
    q = torch.clamp(torch.round(wp / scale[:, None]) + zero[:, None], 0, (1 << bits) - 1)
    return ((q - zero[:, None]) * scale[:, None]).reshape(n, kb * group)[:, :k]


def awq_scale(w: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int | None, symmetric: bool,
              grid: int = 20, max_rows: int = 2048, signed_scales: bool = False) -> tuple[torch.Tensor, float]:
    """AWQ (Lin et al. 2024) for ``w`` ``[N, K]`` with inputs whose Gram matrix is ``hessian``
    (``XᵀX / n``): the scale ``s = rms(x)^α`` per input channel (normalised to a geometric mean of
    1) that minimises the layer's output error ``‖X (Q(W·diag(s))·diag(1/s) − W)ᵀ‖²`` over
    ``α ∈ {0, 1/grid, …, 1}`` (α = 0: no scaling). The activation size is the RMS (the Gram
    matrix's diagonal) where the paper takes the mean magnitude. ``max_rows`` output rows (a fixed
    sample) enter the search. Returns ``(s [K], α)``."""
    H = hessian.to(torch.float32)
    rms = torch.sqrt(torch.diag(H).clamp_min(0))
    rms = rms.clamp_min(float(rms.max()) * 1e-4 + 1e-12)
    w = w.to(torch.float32)
    if w.shape[0] > max_rows:
        w = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]]

    def error(s: torch.Tensor) -> float:
        d = _fake_quant(w * s[None, :], bits, block_size, symmetric, signed_scales) / s[None, :] - w
        return float(((d @ H) * d).sum())

    ones = torch.ones_like(rms)
    best = (error(ones), 0.0, ones)
    for i in range(1, grid + 1):
        a = i / grid
        s = rms ** a
        s = s / torch.sqrt(s.max() * s.min())
        e = error(s)
        if e < best[0]:
            best = (e, a, s)
    return best[2], best[1]


def awq_fold(config, table: WeightTable, targets: dict[str, str], hessians: dict[str, torch.Tensor], cfg: QuantConfig,
             split_gate: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The stored tensors AWQ changes (float32, the table's layouts) and each scaled matrix's scales.

    Each matrix's input channels are multiplied by its scales and the op before it divides by
    them, so the float model computes the same: the fused q/k/v/g(/gate) projection and the MLP's
    gate/up projection after their RMSNorms (the norm weights), ``down_proj`` after ``act(gate) ·
    up`` (``up``'s rows), an untied ``lm_head`` after the final norm. Not scaled: ``o_proj`` (its
    input's norm weight is one per head dimension, shared by the heads) and a tied ``lm_head``
    (the scales would change the embeddings)."""
    new: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        return new[name] if name in new else table.weights[name].produce().detach().to(torch.float32)

    def search(w_nk: torch.Tensor, name: str) -> torch.Tensor:
        # the grid quantize_export's round to nearest uses for this config (quantize_rtn)
        signed = cfg.symmetric and cfg.block_size is not None and cfg.format != "qdq"
        return awq_scale(w_nk, hessians[name], cfg.bits, cfg.block_size, cfg.symmetric, signed_scales=signed)[0]

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        down, gate_up, in_proj = f"{p}.mlp.down_proj.weight", f"{p}.mlp.gate_up_proj.weight", f"{p}.attn.in_proj.weight"
        if down in targets and down in hessians and gate_up in table.weights:
            wd = get(down)  # [inter, hidden]
            s = search(wd.t(), down)
            new[down] = wd * s[:, None]
            gu = get(gate_up).clone()  # [hidden, 2·inter]: gate's columns, then up's
            gu[:, gu.shape[1] - wd.shape[0]:] /= s[None, :]
            new[gate_up] = gu
            scales[down] = s
        for name, norm in ((gate_up, f"{p}.mlp_norm.weight"), (in_proj, f"{p}.attn_norm.weight")):
            if name in targets and name in hessians and norm in table.weights:
                w = get(name)  # [K, N]
                tail = split_gate.get(name, 0)  # the float gate columns take the scales but are not searched on
                s = search(w[:, : w.shape[1] - tail].t(), name)
                new[name] = w * s[:, None]
                new[norm] = get(norm) / s
                scales[name] = s
    if not config.tie_word_embeddings and "lm_head.weight" in targets and "lm_head.weight" in hessians \
            and "model.norm.weight" in table.weights:
        w = get("lm_head.weight")  # [V, H]
        s = search(w, "lm_head.weight")
        new["lm_head.weight"] = w * s[None, :]
        new["model.norm.weight"] = get("model.norm.weight") / s
        scales["lm_head.weight"] = s
    return new, scales


# ---------------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizedExport:
    table: QuantWeightTable
    tensors: dict[str, QTensor]  # float table name -> its quantization ([N, K]: output rows)
    split_gate: dict[str, int]  # fused in_proj name -> how many trailing columns stay float
    metadata: dict[str, Any]
    config: QuantConfig
    uses: dict[str, bool] = field(default_factory=dict)  # the embedding table: quantized for the Gather, the logits
    awq_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # quantized table name -> its input scales (AWQ)

    @property
    def tolerances(self) -> tuple[float, float]:
        return TOLERANCES[self.config.tolerance_key()]

    def reference_model(self, model: GLAForCausalLM) -> GLAForCausalLM:
        """A float32 copy of ``model`` whose quantized weights are their dequantized values: what a
        correct quantized graph computes (the validation reference)."""
        ref = copy.deepcopy(model).float()
        c = ref.config
        for name, qt in self.tensors.items():
            w = torch.from_numpy(qt.dequantize())  # [N, K]
            with torch.no_grad():
                if name == "model.embeddings.weight":
                    if c.tie_word_embeddings and not (self.uses.get("gather") and self.uses.get("gemm")):
                        # a tied table quantized for one use only: the other reads the float table
                        ref.lm_head.weight = torch.nn.Parameter(ref.model.embeddings.weight.detach().clone())
                        target = ref.model.embeddings.weight if self.uses.get("gather") else ref.lm_head.weight
                        target.copy_(w)
                    else:
                        ref.model.embeddings.weight.copy_(w)
                elif name == "lm_head.weight":
                    ref.lm_head.weight.copy_(w)
                else:
                    i = int(name.split(".")[2])
                    layer = ref.model.layers[i]
                    a = layer.attn
                    if name.endswith("attn.in_proj.weight"):
                        parts = [a.q_proj, a.k_proj, a.v_proj] + ([a.g_proj] if c.use_output_gate else [])
                        if name not in self.split_gate:
                            parts.append(a.gk_proj[0])
                        row = 0
                        for m in parts:
                            m.weight.copy_(w[row:row + m.weight.shape[0]])
                            row += m.weight.shape[0]
                    elif name.endswith("attn.gk_proj.1.weight"):
                        a.gk_proj[1].weight.copy_(w)
                    elif name.endswith("attn.o_proj.weight"):
                        a.o_proj.weight.copy_(w)
                    elif name.endswith("mlp.gate_up_proj.weight"):
                        s = layer.mlp.gate_proj.weight.shape[0]
                        layer.mlp.gate_proj.weight.copy_(w[:s])
                        layer.mlp.up_proj.weight.copy_(w[s:])
                    elif name.endswith("mlp.down_proj.weight"):
                        layer.mlp.down_proj.weight.copy_(w)
                    else:
                        raise KeyError(name)
        # AWQ: the ops before the scaled matrices take the inverse scales (awq_fold)
        with torch.no_grad():
            for name, sc in self.awq_scales.items():
                sc = sc.to(torch.float32)
                if name == "lm_head.weight":
                    ref.model.norm.weight.div_(sc)
                    continue
                layer = ref.model.layers[int(name.split(".")[2])]
                if name.endswith("mlp.gate_up_proj.weight"):
                    layer.mlp_norm.weight.div_(sc)
                elif name.endswith("attn.in_proj.weight"):
                    layer.attn_norm.weight.div_(sc)
                    if name in self.split_gate:  # the float gate columns read the scaled input too
                        layer.attn.gk_proj[0].weight.mul_(sc[None, :])
                # mlp.down_proj: its inverse went into up_proj's rows, part of gate_up's dequantized values
        return ref


def _gather_quantized(cfg: QuantConfig, config) -> bool:
    """Whether the embedding Gather becomes GatherBlockQuantized (matmulnbits only). Not for int4
    with an odd hidden size: GatherBlockQuantized unpacks whole bytes, two codes each."""
    return cfg.quantize_embedding and cfg.format == "matmulnbits" and not (cfg.bits == 4 and config.hidden_size % 2)


def _targets(model: GLAForCausalLM, table: WeightTable, cfg: QuantConfig) -> dict[str, str]:
    """``{table weight name: role}`` of the weights to quantize."""
    c = model.config
    out: dict[str, str] = {}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.attn.in_proj.weight"] = "attn"
        if cfg.quantize_gate:
            out[f"{p}.attn.gk_proj.1.weight"] = "gate"
        out[f"{p}.attn.o_proj.weight"] = "attn"
        out[f"{p}.mlp.gate_up_proj.weight"] = "mlp"
        out[f"{p}.mlp.down_proj.weight"] = "mlp"
    emb_gather = _gather_quantized(cfg, c)
    if c.tie_word_embeddings:
        if cfg.quantize_lm_head or emb_gather:
            out["model.embeddings.weight"] = "embedding+lm_head"
    else:
        if cfg.quantize_lm_head:
            out["lm_head.weight"] = "lm_head"
        if emb_gather:
            out["model.embeddings.weight"] = "embedding"
    return {k: v for k, v in out.items() if k in table.weights}


def _consumers(builders: dict[str, GraphBuilder], name: str) -> list[tuple[str, onnx.NodeProto]]:
    return [(kind, n) for kind, b in builders.items() for n in b.nodes if name in n.input]


def quantize_export(model: GLAForCausalLM, table: WeightTable, builders: dict[str, GraphBuilder],
                    cfg: QuantConfig, act_dtype: torch.dtype, progress=None) -> QuantizedExport:
    """Quantize ``table``'s linear weights and rewrite the nodes of ``builders`` that read them.

    Returns the new table (write it instead of ``table``; the float tensors it no longer needs are
    gone from it) and what the metadata records. ``model`` is only read.
    """
    cfg = cfg.validated()
    if act_dtype not in (torch.float32, torch.float16):
        raise UsageError("quantized weights need float32 or float16 activations (MatMulNBits and DequantizeLinear have no bfloat16 CPU kernels)")
    np_act = np.float32 if act_dtype == torch.float32 else np.float16
    c = model.config
    targets = _targets(model, table, cfg)
    split_gate: dict[str, int] = {}
    if not cfg.quantize_gate:
        split_gate = {f"model.layers.{i}.attn.in_proj.weight": c.gate_low_rank_dim for i in range(c.num_hidden_layers)}

    hessians: dict[str, torch.Tensor] = {}
    calibration_note = None
    if cfg.method in ("gptq", "awq"):
        path = Path(cfg.calibration) if cfg.calibration else DEFAULT_CALIBRATION
        text = path.read_text(encoding="utf-8", errors="replace")
        seqs = calibration_ids(text, c, cfg.calibration_tokens)
        if not seqs:
            raise UsageError(f"calibration text {path} is too short (needs at least 16 bytes)")
        ref = model if all(p.dtype == torch.float32 for p in model.parameters()) else copy.deepcopy(model).float()
        hessians = collect_hessians(ref, seqs)
        del ref
        calibration_note = {"file": str(path) if cfg.calibration else "gla_export/assets/sample-model/calibration.txt",
                            "tokens": sum(len(s) for s in seqs)}

    # AWQ: the float model changed where it stays equivalent (weights scaled per input channel, the
    # op before them by the inverse), then round to nearest
    awq_new: dict[str, torch.Tensor] = {}
    awq_scales: dict[str, torch.Tensor] = {}
    if cfg.method == "awq":
        awq_new, awq_scales = awq_fold(c, table, targets, hessians, cfg, split_gate)

    tensors: dict[str, QTensor] = {}
    gate_columns: dict[str, torch.Tensor] = {}
    for name, role in targets.items():
        if name in awq_new:
            stored = awq_new[name].to(table.weights[name].dtype)
        else:
            stored = table.weights[name].produce().detach()
        if name in split_gate:
            gate_columns[name] = stored[:, stored.shape[1] - split_gate[name]:].contiguous()
            stored = stored[:, : stored.shape[1] - split_gate[name]]
        is_kn = name not in ("model.embeddings.weight", "lm_head.weight")  # MatMul weights are stored [K, N]
        rtn = cfg.method in ("rtn", "awq") or (cfg.method == "gptq" and name not in hessians) or (
            cfg.method == "hqq" and role in ("embedding", "embedding+lm_head"))  # GatherBlockQuantized: integer zero points
        if rtn and is_kn and not (cfg.block_size is None or (cfg.symmetric and cfg.format == "qdq")):
            # ORT's kernel reads [K, N]: hand it the stored layout (no transposes of large matrices)
            tensors[name] = quantize_rtn(None, cfg.bits, cfg.block_size, cfg.symmetric, w_kn=stored.float().contiguous().numpy())
        else:
            w_np = np.ascontiguousarray((stored.t() if is_kn else stored).float().numpy())
            if rtn:
                tensors[name] = quantize_rtn(w_np, cfg.bits, cfg.block_size, cfg.symmetric, positive_scales=cfg.format == "qdq")
            elif cfg.method == "gptq":
                tensors[name] = quantize_gptq(w_np, hessians[name], cfg.bits, cfg.block_size, cfg.symmetric, cfg.gptq_damp)
            else:
                tensors[name] = quantize_hqq(w_np, cfg.bits, cfg.block_size)
        del stored
        if progress is not None:
            progress(1)

    # the new table: float weights that stay, in their order, each quantized one in its place
    new = QuantWeightTable(table.file_name)
    rewrites: dict[str, dict[str, Any]] = {}
    head = "model.embeddings.weight" if c.tie_word_embeddings else "lm_head.weight"
    for name, wt in table.weights.items():
        if name not in tensors:
            if name in awq_new:  # a norm weight AWQ divided by the scales of the matrix after it
                new.weights[name] = Weight(name, wt.shape, wt.dtype, lambda t=awq_new[name].to(wt.dtype): t)
            else:
                new.weights[name] = wt
            continue
        qt = tensors[name]
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        entry: dict[str, Any] = {"qt": qt}
        if name == "model.embeddings.weight":
            entry["gather"] = _gather_quantized(cfg, c) or (cfg.format == "qdq" and c.tie_word_embeddings and cfg.quantize_lm_head)
        if name == head:
            entry["gemm"] = cfg.quantize_lm_head
        if entry.get("gather") is False or entry.get("gemm") is False:
            new.weights[name] = wt  # a tied table quantized for one of its two uses keeps its float copy for the other
        if name in split_gate:
            gate = gate_columns.pop(name)
            entry["float_tail"] = new.add(f"{base}.gate_columns.weight", tuple(gate.shape), gate.dtype, lambda g=gate: g)
        if cfg.format == "matmulnbits":
            arrs = matmulnbits_arrays(qt, np_act)
            entry["B"] = new.add_packed(f"{base}.qweight", arrs["B"], arrs["B"].shape, TensorProto.UINT8)
            entry["scales"] = new.add_array(f"{base}.scales", arrs["scales"])
            if "zero_points" in arrs:
                entry["zero_points"] = new.add_array(f"{base}.zero_points", arrs["zero_points"])
            if entry.get("gather"):
                n, k = qt.shape
                if k % qt.block_size == 0:  # the same bytes as MatMulNBits' B, read as [V, H·bits/8]
                    entry["gather_data"] = new.add_alias(f"{base}.qweight.gather", entry["B"], (n, arrs["B"].shape[1] * arrs["B"].shape[2]))
                else:
                    # MatMulNBits pads each row to whole blocks; GatherBlockQuantized's rows are exactly
                    # H codes (its output is as wide as its data): an unpadded copy of the codes
                    data = _pack_nibbles(qt.codes) if qt.bits == 4 else qt.codes
                    entry["gather_data"] = new.add_packed(f"{base}.qweight.gather", data, data.shape, TensorProto.UINT8)
        else:
            transpose = name not in ("model.embeddings.weight", "lm_head.weight")
            arrs = qdq_arrays(qt, np_act, transpose)
            raw, dims, elem = arrs["data"]
            entry["data"] = new.add_packed(f"{base}.qweight", raw, dims, elem)
            entry["scales"] = new.add_array(f"{base}.scales", arrs["scales"])
            if arrs["zero_point"] is not None:
                zraw, zdims, zelem = arrs["zero_point"]
                entry["zero_point"] = new.add_packed(f"{base}.zero_point", zraw, zdims, zelem)
            entry["axis"] = 0 if transpose else 1
        rewrites[name] = entry

    for kind, b in builders.items():
        _rewrite(b, rewrites, cfg, kind)

    by_role: dict[str, list[str]] = {}
    for name, role in targets.items():
        by_role.setdefault(role, []).append(name)
    atol, rtol = TOLERANCES[cfg.tolerance_key()]
    meta = {
        "weights": cfg.weights,
        "bits": cfg.bits,
        "format": cfg.format,
        "op": "com.microsoft::MatMulNBits" if cfg.format == "matmulnbits" else "DequantizeLinear+MatMul",
        "block_size": cfg.block_size,
        "per_channel": cfg.block_size is None,
        "symmetric": cfg.symmetric,
        "method": cfg.method,
        "accuracy_level": cfg.accuracy_level if cfg.format == "matmulnbits" else None,
        "calibration": calibration_note,
        "awq_scaled": sorted(awq_scales) if cfg.method == "awq" else None,
        "quantized": {
            "attention_projections": True,
            "gate_projections": cfg.quantize_gate,
            "mlp": True,
            "lm_head": bool(rewrites.get(head, {}).get("gemm")),
            "embedding": bool(rewrites.get("model.embeddings.weight", {}).get("gather")),
        },
        "kept_float": ["norms", "short convolution", "gate bias and logsigmoid/normalizer path", "recurrent state"]
                      + ([] if cfg.quantize_gate else ["gate low-rank projections"]),
        "tensors": len(tensors),
        "quantized_parameters": int(sum(qt.codes.size for qt in tensors.values())),
        "config": asdict(cfg),  # everything needed to quantize again (dequantized_reference)
        "tolerances": {k: {"atol": a, "rtol": r} for k, (a, r) in TOLERANCES.items()},
        "validation_tolerance": {"atol": atol, "rtol": rtol},
    }
    emb = rewrites.get("model.embeddings.weight", {})
    uses = {"gather": bool(emb.get("gather")), "gemm": bool(emb.get("gemm"))}
    return QuantizedExport(new, tensors, split_gate, meta, cfg, uses, awq_scales)


def _rewrite(b: GraphBuilder, rewrites: dict[str, dict[str, Any]], cfg: QuantConfig, kind: str) -> None:
    """Replace the nodes of ``b`` that read a quantized weight; update the weights it uses."""
    new_nodes: list[onnx.NodeProto] = []
    used: list[str] = []

    def use(name):
        if name not in used:
            used.append(name)
        return name

    for node in b.nodes:
        w = None
        if node.op_type == "MatMul" and node.input[1] in rewrites:
            w = node.input[1]
        elif node.op_type == "Gemm" and node.input[1] in rewrites and rewrites[node.input[1]].get("gemm"):
            w = node.input[1]
        elif node.op_type == "Gather" and node.input[0] in rewrites and rewrites[node.input[0]].get("gather"):
            w = node.input[0]
        if w is None:
            for name in node.input:
                if name in b._used:
                    use(name)
            new_nodes.append(node)
            continue
        e = rewrites[w]
        qt: QTensor = e["qt"]
        n, k = qt.shape
        out = node.output[0]
        nm = node.name
        if node.op_type == "Gather":
            if cfg.format == "matmulnbits":
                inputs = [use(e["gather_data"]), node.input[1], use(e["scales"])]
                if "zero_points" in e:
                    inputs.append(use(e["zero_points"]))
                new_nodes.append(helper.make_node("GatherBlockQuantized", inputs, [out], name=f"{nm}/GatherBlockQuantized",
                                                  domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=qt.block_size, bits=qt.bits))
            elif cfg.format == "qdq":
                deq = _dq_node(e, qt, nm, use, new_nodes)
                new_nodes.append(helper.make_node("Gather", [deq, node.input[1]], [out], name=nm, axis=0))
            continue
        x = node.input[0]
        if node.op_type == "Gemm":
            transb = next((a.i for a in node.attribute if a.name == "transB"), 0)
            if not transb:
                raise RuntimeError(f"internal: {nm} is a Gemm without transB over a quantized weight")
        q_out = out if "float_tail" not in e else f"{nm}/quantized_columns"
        if cfg.format == "matmulnbits":
            inputs = [x, use(e["B"]), use(e["scales"])]
            if "zero_points" in e:
                inputs.append(use(e["zero_points"]))
            attrs = dict(K=k, N=n, bits=qt.bits, block_size=qt.block_size)
            if cfg.accuracy_level:
                attrs["accuracy_level"] = cfg.accuracy_level
            new_nodes.append(helper.make_node("MatMulNBits", inputs, [q_out], name=f"{nm}/MatMulNBits", domain=MS_DOMAIN, **attrs))
        else:
            deq = _dq_node(e, qt, nm, use, new_nodes)
            if node.op_type == "Gemm":
                new_nodes.append(helper.make_node("Gemm", [x, deq], [q_out], name=nm, transB=1))
            else:
                new_nodes.append(helper.make_node("MatMul", [x, deq], [q_out], name=nm))
        if "float_tail" in e:
            tail = f"{nm}/float_columns"
            new_nodes.append(helper.make_node("MatMul", [x, use(e["float_tail"])], [tail], name=f"{nm}/float_columns"))
            new_nodes.append(helper.make_node("Concat", [q_out, tail], [out], name=f"{nm}/Concat", axis=-1))
    b.nodes[:] = new_nodes
    b.used_weights[:] = used
    b._used = set(used)


def _dq_node(e: dict[str, Any], qt: QTensor, nm: str, use, nodes: list) -> str:
    out = f"{nm}/dequantized_weight"
    if out in {o for n in nodes for o in n.output}:
        return out
    inputs = [use(e["data"]), use(e["scales"])]
    if "zero_point" in e:
        inputs.append(use(e["zero_point"]))
    attrs: dict[str, Any] = {"axis": e["axis"] if not qt.per_channel else 1 - e["axis"]}
    if not qt.per_channel:
        attrs["block_size"] = qt.block_size
    nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=f"{nm}/DequantizeLinear", **attrs))
    return out


def opset_imports(b: GraphBuilder) -> list[onnx.OperatorSetIdProto]:
    """The com.microsoft import a quantized graph needs (none for a float or QDQ graph)."""
    if any(n.domain == MS_DOMAIN for n in b.nodes):
        return [helper.make_opsetid(MS_DOMAIN, 1)]
    return []


def config_dict(cfg: QuantConfig) -> dict[str, Any]:
    return asdict(cfg)


def dequantized_reference(model: GLAForCausalLM, meta: dict[str, Any]) -> GLAForCausalLM:
    """For ``verify``: the float model of a quantized export with its quantized weights replaced by
    their dequantized values (quantized again from the metadata's config: every method here is
    deterministic), in the model's dtype. ``model`` itself when the export is not quantized."""
    q = meta.get("quantization")
    if not q:
        return model
    from .model_graph import GraphSpec, build_graph, register_weights

    cfg = QuantConfig(**q["config"])
    act = torch_dtype(meta["dtype"])  # float32 or float16: quantize_export refuses the rest
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    cpu = copy.deepcopy(model).to("cpu").float()
    spec = GraphSpec(cpu.config, torch.float32, torch.float32, "custom", False)
    table = WeightTable("weights")
    register_weights(cpu, table)
    builders = {"step": build_graph(spec, table, "step")}
    quantized = quantize_export(cpu, table, builders, cfg, act)
    return quantized.reference_model(cpu).to(device=device, dtype=dtype).eval()


def estimate_weights_bytes(model_config, cfg: QuantConfig | None, act_bytes: int = 2) -> dict[str, int]:
    """The weights file of an export, without writing it (alignment padding aside):
    ``{"total": ..., "embedding": ...}`` in bytes; ``cfg`` None for the float export.
    The model is built on the meta device, so any size costs nothing."""
    from ..models.modeling import GLAForCausalLM

    with torch.device("meta"):
        model = GLAForCausalLM(model_config)
    table = WeightTable("weights")
    from .model_graph import register_weights

    register_weights(model, table)
    targets = _targets(model, table, cfg) if cfg is not None else {}
    total = emb = 0
    for name, w in table.weights.items():
        numel = int(np.prod(w.shape))
        if name not in targets:
            nbytes = numel * act_bytes
        else:
            n, k = (w.shape if name in ("model.embeddings.weight", "lm_head.weight") else w.shape[::-1])
            if not cfg.quantize_gate and name.endswith("attn.in_proj.weight"):
                r = model_config.gate_low_rank_dim
                n -= r
                total += k * r * act_bytes  # the gate's columns stay float
            kb = 1 if cfg.block_size is None else -(-k // cfg.block_size)
            nbytes = n * k * cfg.bits // 8 + n * kb * act_bytes
            if not cfg.symmetric:
                nbytes += n * kb * cfg.bits // 8
        total += nbytes
        if name == "model.embeddings.weight":
            emb = nbytes
    return {"total": total, "embedding": emb}
