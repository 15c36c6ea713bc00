"""Fused recurrent step: the state stays in registers for the whole sequence.

One program per (d_v block, sequence·kv head) holds its ``[d_k, BV]`` slice of the state, reads
it once, walks the steps (decode is one step) and writes it once. Every query head of the GQA
group reads the kv head's state in the same program, so the state is never read twice. No
tl.dot: the step is an outer product and a reduction over d_k, which is also what lets the same
kernel run in float64 (float64 inputs or a float64 state accumulate in float64, like the
reference).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import new_buffer, pow2_at_least, sm_count


@triton.jit(do_not_specialize=["T"])
def _recurrent_kernel(
    q, k, v, g, gamma, h0, o, ht, cu_seqlens, scale_hi, scale_lo, T,
    HQ: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HEAD_GATE: tl.constexpr, HAS_GAMMA: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)  # one flat axis (the others stop at 65535): d_v block fastest
    i_v, i_nh = pid % tl.cdiv(V, BV), pid // tl.cdiv(V, BV)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n.to(tl.int64) * T
        L = T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    s_off = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    b_s = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_s += tl.load(h0 + s_off, mask=m_kv, other=0.0).to(ACC)
    if HAS_GAMMA:
        b_gamma = tl.load(gamma + i_h).to(ACC)
    for s in range(0, L):
        if REVERSE:
            pos = bos + (L - 1 - s)
        else:
            pos = bos + s
        b_k = tl.load(k + (pos * H + i_h) * K + o_k, mask=m_k, other=0.0).to(ACC)
        b_v = tl.load(v + (pos * H + i_h) * V + o_v, mask=m_v, other=0.0).to(ACC)
        if HAS_G:
            if HEAD_GATE:
                b_g = tl.load(g + pos * H + i_h).to(ACC)
                if HAS_GAMMA:
                    b_g += b_gamma
                b_s *= tl.exp(b_g)
            else:
                b_g = tl.load(g + (pos * H + i_h) * K + o_k, mask=m_k, other=0.0).to(ACC)
                if HAS_GAMMA:
                    b_g += b_gamma
                b_s *= tl.exp(b_g)[:, None]
        elif HAS_GAMMA:
            b_s *= tl.exp(b_gamma)
        b_s += b_k[:, None] * b_v[None, :]
        for j in range(0, HQ // H):
            i_hq = i_h * (HQ // H) + j
            b_q = tl.load(q + (pos * HQ + i_hq) * K + o_k, mask=m_k, other=0.0).to(ACC)
            b_o = tl.sum(b_q[:, None] * b_s, axis=0)
            # scale arrives as float32 halves so that a float64 result keeps all its digits
            b_o = b_o * scale_hi + b_o * scale_lo
            tl.store(o + (pos * HQ + i_hq) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + s_off, b_s.to(ht.dtype.element_ty), mask=m_kv)


def _blocks(K: int, V: int, programs_per_block: int, device: torch.device) -> tuple[int, int, int]:
    """(BK, BV, num_warps): all of d_k in one tile (the output needs the full sum), d_v tiles
    of at most 4096 state elements per program, smaller while that leaves fewer than two
    programs per multiprocessor (decode at batch 1 is otherwise a handful of programs)."""
    BK = pow2_at_least(K)
    BV = max(16, min(64, pow2_at_least(V), 4096 // BK))
    while BV > 16 and triton.cdiv(V, BV) * programs_per_block < 2 * sm_count(device):
        BV //= 2
    num_warps = 4 if BK * BV <= 4096 else 8
    return BK, BV, num_warps


def recurrent_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    h0: torch.Tensor | None,
    scale: float,
    reverse: bool,
    N: int,
    cu_dev: torch.Tensor | None,
    ht_dtype: torch.dtype | None,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Contiguous ``[B, T, H, D]`` inputs; ``acc`` is float32 or float64. Returns ``(o, final state or None)``."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    dev = q.device
    o = new_buffer((B, T, HQ, V), q.dtype, dev)
    ht = new_buffer((N, H, K, V), ht_dtype, dev) if ht_dtype is not None else None
    BK, BV, num_warps = _blocks(K, V, N * H, dev)
    scale_hi = float(np.float32(scale))
    _recurrent_kernel[(triton.cdiv(V, BV) * N * H,)](
        q, k, v, g, g_gamma, h0, o, ht, cu_dev, scale_hi, scale - scale_hi, T,
        HQ=HQ, H=H, K=K, V=V, BK=BK, BV=BV,
        HAS_G=g is not None, HEAD_GATE=g is not None and g.shape[3] == 1, HAS_GAMMA=g_gamma is not None,
        USE_H0=h0 is not None, STORE_HT=ht is not None, REVERSE=reverse, IS_VARLEN=cu_dev is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=num_warps,
    )
    return o, ht
