"""Chunked prefill: the chunk matrix form of GLA (see gla_export/ops/chunk.py) as four kernels.

Time is cut into chunks of ``BT`` steps. ``Γ`` is the running sum of the log decay inside a
chunk, so every factor below is ``exp`` of a non-positive number when ``g ≤ 0``:

1. ``_gate_cumsum_kernel``  Γ, float32, one program per (chunk, batch·kv head).
2. ``_chunk_state_kernel``  the state at the start of every chunk, carried chunk to chunk:
   ``S ← exp(Γ_C) ⊙ S + (k ⊙ exp(Γ_C − Γ))ᵀ v``. The only sequential pass; it is split over
   (d_k block, d_v block, sequence·kv head) programs so that small B·H still fills the GPU,
   and it writes the final state.
3. ``_chunk_scores_kernel`` the causal intra-chunk scores ``A[i, j] = q_i · (k_j ⊙ exp(Γ_i − Γ_j))``
   in float32, one program per (sub-chunk of ``BC`` rows, batch·query head). With a gate per
   key dim the exponent differs per column, so blocks of earlier sub-chunks are split at the
   first row ``n`` of the current one (``exp(Γ_i − Γ_n) · exp(Γ_n − Γ_j)``, both ≤ 1) and the
   diagonal block takes every pair's own exponent. With a gate per head (or none) the factor is
   a scalar per pair and the scores are one product.
4. ``_chunk_output_kernel`` ``o = scale · ((q ⊙ exp(Γ)) S_start + A v)``, one program per
   (chunk, d_v block, batch·query head): fully parallel.

Sequences are addressed through their logical time: step ``t`` of a sequence starting at packed
row ``bos`` with length ``L`` lives at row ``bos + t``, or ``bos + L − 1 − t`` with ``reverse``,
so reversed and ragged inputs need no copies. ``cu_seqlens`` gives (bos, L) per sequence and a
host-built table maps each chunk program to its (sequence, chunk) pair.

Products: float32 inputs use exact float32 dots (``input_precision="ieee"``); float16/bfloat16
inputs feed the tensor cores in their own type with float32 accumulation. The float16 path
rescales the state and score tiles by their maximum before the cast, so a state beyond the
float16 range does not overflow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, new_buffer, pow2_at_least, sm_count

BT = 64  # chunk length
BC = 16  # sub-chunk length for the per-key-gate scores; tl.dot needs >= 16


@triton.jit
def _bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """(first packed row, length) of sequence ``i_n``."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n.to(tl.int64) * T
        L = T
    return bos, L


@triton.jit
def _rows(bos, L, t, REVERSE: tl.constexpr):
    """Packed row of logical step ``t``."""
    if REVERSE:
        pos = bos + (L - 1 - t)
    else:
        pos = bos + t
    return pos


@triton.jit
def _chunk_of(i_c, i_b, chunk_indices, IS_VARLEN: tl.constexpr):
    """(sequence, chunk within the sequence) of chunk program ``i_c``."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c)
        i_t = tl.load(chunk_indices + 2 * i_c + 1)
    else:
        i_n = i_b
        i_t = i_c
    return i_n, i_t


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, DT: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` in float32: exact float32 products, or tensor-core products of operands
    rounded to ``DT``. ``UPCAST`` multiplies the rounded operands in float32 instead, for the
    interpreter, whose tl.dot cannot read bfloat16 (triton-lang/triton#11584)."""
    if IEEE:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif UPCAST:
        r = tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a.to(DT), b.to(DT))
    return r


@triton.jit
def _fp16_scale(x):
    """``s ≥ 1`` with ``|x / s| ≤ 2^15``: keeps a float32 tile finite when cast to float16."""
    return tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0) * (1.0 / 32768.0), 1.0)


@triton.jit(do_not_specialize=["T", "NCP"])
def _gate_cumsum_kernel(
    g, gamma, gc, cu_seqlens, chunk_indices, T, NCP,
    H: tl.constexpr, KG: tl.constexpr, BKG: tl.constexpr, BT: tl.constexpr,
    HAS_G: tl.constexpr, HAS_GAMMA: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # one flat grid axis (the others stop at 65535): chunk fastest
    pid = tl.program_id(0)
    i_c, i_bh = pid % NCP, pid // NCP
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_t = _chunk_of(i_c, i_b, chunk_indices, IS_VARLEN)
    bos, L = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    t = i_t * BT + tl.arange(0, BT)
    m_t = t < L
    pos = _rows(bos, L, t, REVERSE)
    for i_k in range(tl.cdiv(KG, BKG)):
        o_k = i_k * BKG + tl.arange(0, BKG)
        m = m_t[:, None] & (o_k < KG)[None, :]
        off = (pos[:, None] * H + i_h) * KG + o_k[None, :]
        if HAS_G:
            b_g = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
        else:
            b_g = tl.zeros([BT, BKG], dtype=tl.float32)
        if HAS_GAMMA:
            b_g += tl.where(m, tl.load(gamma + i_h).to(tl.float32), 0.0)
        tl.store(gc + off, tl.cumsum(b_g, axis=0), mask=m)


@triton.jit(do_not_specialize=["T"])
def _chunk_state_kernel(
    k, v, gc, h0, h, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, HEAD_GATE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    NV = tl.cdiv(V, BV)
    NKV = tl.cdiv(K, BK) * NV
    pid = tl.program_id(0)
    i_kv, i_nh = pid % NKV, pid // NKV
    i_n, i_h = i_nh // H, i_nh % H
    i_k, i_v = i_kv // NV, i_kv % NV
    bos, L = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    s_off = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + s_off, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(0, tl.cdiv(L, BT)):
        tl.store(h + ((c0 + i_t) * H + i_h) * K * V + s_off, b_h, mask=m_kv)
        t = i_t * BT + tl.arange(0, BT)
        m_t = t < L
        pos = _rows(bos, L, t, REVERSE)
        b_k = tl.load(k + (pos[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + (pos[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if USE_G:
            # rows past the end load Γ = 0 and k = 0: their factor exp(Γ_C) ≤ 1 multiplies zero
            last = _rows(bos, L, tl.minimum(i_t * BT + BT, L) - 1, REVERSE)
            if HEAD_GATE:
                b_G = tl.load(gc + pos * H + i_h, mask=m_t, other=0.0)
                b_Gl = tl.load(gc + last * H + i_h)
                b_kd = b_k.to(tl.float32) * tl.exp(b_Gl - b_G)[:, None]
                b_h *= tl.exp(b_Gl)
            else:
                b_G = tl.load(gc + (pos[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
                b_Gl = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0.0)
                b_kd = b_k.to(tl.float32) * tl.exp(b_Gl[None, :] - b_G)
                b_h *= tl.exp(b_Gl)[:, None]
        else:
            b_kd = b_k
        b_h += _dot(tl.trans(b_kd), b_v, IEEE, v.dtype.element_ty, UPCAST)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + s_off, b_h.to(ht.dtype.element_ty), mask=m_kv)


@triton.jit(do_not_specialize=["T", "NCP"])
def _chunk_scores_kernel(
    q, k, gc, A, cu_seqlens, chunk_indices, T, NCP,
    HQ: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BKD: tl.constexpr,
    USE_G: tl.constexpr, HEAD_GATE: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)  # sub-chunk fastest, then chunk, then batch·head
    i_ca, i_bh = pid % (NCP * (BT // BC)), pid // (NCP * (BT // BC))
    i_c, i_a = i_ca // (BT // BC), i_ca % (BT // BC)
    i_b, i_hq = i_bh // HQ, i_bh % HQ
    i_h = i_hq // (HQ // H)
    i_n, i_t = _chunk_of(i_c, i_b, chunk_indices, IS_VARLEN)
    bos, L = _bounds(cu_seqlens, i_n, T, IS_VARLEN)

    n = i_t * BT + i_a * BC  # first row of this sub-chunk
    if n < L:
        o_i = tl.arange(0, BC)
        t_i = n + o_i
        m_i = t_i < L
        pos_i = _rows(bos, L, t_i, REVERSE)
        p_A = A + (pos_i[:, None] * HQ + i_hq) * BT

        if USE_G and not HEAD_GATE:
            # earlier sub-chunks: exp(Γ_i − Γ_j) = exp(Γ_i − Γ_n) · exp(Γ_n − Γ_j), each ≤ 1
            pos_n = _rows(bos, L, n, REVERSE)
            for i_j in range(0, i_a):
                t_j = i_t * BT + i_j * BC + o_i
                pos_j = _rows(bos, L, t_j, REVERSE)
                b_A = tl.zeros([BC, BC], dtype=tl.float32)
                for i_k in range(0, tl.cdiv(K, BK)):
                    o_k = i_k * BK + tl.arange(0, BK)
                    m_k = o_k < K
                    m_ik = m_i[:, None] & m_k[None, :]
                    b_q = tl.load(q + (pos_i[:, None] * HQ + i_hq) * K + o_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
                    b_k = tl.load(k + (pos_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
                    b_Gi = tl.load(gc + (pos_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_ik, other=0.0)
                    b_Gj = tl.load(gc + (pos_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_k[None, :], other=0.0)
                    b_Gn = tl.load(gc + (pos_n * H + i_h) * K + o_k, mask=m_k, other=0.0)
                    b_qg = b_q * tl.exp(tl.where(m_ik, b_Gi - b_Gn[None, :], 0.0))
                    b_kg = b_k * tl.exp(b_Gn[None, :] - b_Gj)
                    b_A = tl.dot(b_qg, tl.trans(b_kg), b_A, input_precision="ieee")
                tl.store(p_A + (i_j * BC + o_i)[None, :], b_A, mask=m_i[:, None])
            # the diagonal block: every pair (i, j ≤ i) with its own exponent, none above 0
            m_ij = (o_i[:, None] >= o_i[None, :]) & m_i[:, None]
            b_A = tl.zeros([BC, BC], dtype=tl.float32)
            for i_k in range(0, tl.cdiv(K, BKD)):
                o_k = i_k * BKD + tl.arange(0, BKD)
                m_ik = m_i[:, None] & (o_k < K)[None, :]
                b_q = tl.load(q + (pos_i[:, None] * HQ + i_hq) * K + o_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
                b_k = tl.load(k + (pos_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
                b_G = tl.load(gc + (pos_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_ik, other=0.0)
                expo = tl.where(m_ij[:, :, None], b_G[:, None, :] - b_G[None, :, :], 0.0)
                b_A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * tl.exp(expo), axis=2)
            b_A = tl.where(m_ij, b_A, 0.0)
            tl.store(p_A + (i_a * BC + o_i)[None, :], b_A, mask=m_i[:, None])
        else:
            # one decay per head (or none): the factor is a scalar per pair, so one product
            o_j = tl.arange(0, BT)
            t_j = i_t * BT + o_j
            m_j = (t_j < L) & (t_j <= n + BC - 1)
            pos_j = _rows(bos, L, t_j, REVERSE)
            b_A = tl.zeros([BC, BT], dtype=tl.float32)
            for i_k in range(0, tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_k = o_k < K
                b_q = tl.load(q + (pos_i[:, None] * HQ + i_hq) * K + o_k[None, :], mask=m_i[:, None] & m_k[None, :], other=0.0)
                b_k = tl.load(k + (pos_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0.0)
                b_A = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), b_A, input_precision="ieee")
            m_ij = (t_i[:, None] >= t_j[None, :]) & m_i[:, None] & m_j[None, :]
            if USE_G:
                b_Gi = tl.load(gc + pos_i * H + i_h, mask=m_i, other=0.0)
                b_Gj = tl.load(gc + pos_j * H + i_h, mask=m_j, other=0.0)
                b_A *= tl.exp(tl.where(m_ij, b_Gi[:, None] - b_Gj[None, :], 0.0))
            b_A = tl.where(m_ij, b_A, 0.0)
            tl.store(p_A + o_j[None, :], b_A, mask=m_i[:, None] & (o_j < n - i_t * BT + BC)[None, :])




@triton.jit(do_not_specialize=["T", "NCP"])
def _chunk_output_kernel(
    q, v, gc, h, A, o, cu_seqlens, chunk_indices, scale, T, NCP,
    HQ: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, HEAD_GATE: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
    IEEE: tl.constexpr, FIT_FP16: tl.constexpr, UPCAST: tl.constexpr,
):
    NV = tl.cdiv(V, BV)
    pid = tl.program_id(0)  # d_v block fastest (they share q, Γ and A), then chunk, then batch·head
    i_v, i_c, i_bh = pid % NV, (pid // NV) % NCP, pid // (NV * NCP)
    i_b, i_hq = i_bh // HQ, i_bh % HQ
    i_h = i_hq // (HQ // H)
    i_n, i_t = _chunk_of(i_c, i_b, chunk_indices, IS_VARLEN)
    bos, L = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        i_g = i_c.to(tl.int64)
    else:
        i_g = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_c

    o_t = tl.arange(0, BT)
    t = i_t * BT + o_t
    m_t = t < L
    pos = _rows(bos, L, t, REVERSE)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]

    # the state carried into the chunk
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + (pos[:, None] * HQ + i_hq) * K + o_k[None, :], mask=m_tk, other=0.0)
        if USE_G:
            if HEAD_GATE:
                b_G = tl.load(gc + pos * H + i_h, mask=m_t, other=0.0)
                b_q = b_q.to(tl.float32) * tl.exp(b_G)[:, None]
            else:
                b_G = tl.load(gc + (pos[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
                b_q = b_q.to(tl.float32) * tl.exp(b_G)
        b_h = tl.load(h + (i_g * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        if FIT_FP16:
            s = _fp16_scale(b_h)
            b_o += _dot(b_q, b_h / s, IEEE, q.dtype.element_ty, UPCAST) * s
        else:
            b_o += _dot(b_q, b_h, IEEE, q.dtype.element_ty, UPCAST)

    # inside the chunk; the scores kernel wrote only j ≤ i, the rest is masked here
    b_A = tl.load(A + (pos[:, None] * HQ + i_hq) * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    b_A = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[:, None], b_A, 0.0)
    b_v = tl.load(v + (pos[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
    if FIT_FP16:
        s = _fp16_scale(b_A)
        b_o += _dot(b_A / s, b_v, IEEE, v.dtype.element_ty, UPCAST) * s
    else:
        b_o += _dot(b_A, b_v, IEEE, v.dtype.element_ty, UPCAST)
    tl.store(o + (pos[:, None] * HQ + i_hq) * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m_tv)


def _chunk_table(cu: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sequence, chunk) of every chunk program and each sequence's first chunk, for cu_seqlens."""
    pairs, offsets = [], [0]
    for n in range(len(cu) - 1):
        nt = triton.cdiv(cu[n + 1] - cu[n], BT)
        pairs += [(n, i) for i in range(nt)]
        offsets.append(offsets[-1] + nt)
    table = torch.tensor(pairs if pairs else [(0, 0)], dtype=torch.int32).reshape(-1, 2)
    return table.to(device), torch.tensor(offsets, dtype=torch.int32).to(device), len(pairs)


def _state_blocks(K: int, V: int, programs_per_block: int, device: torch.device) -> tuple[int, int]:
    """d_k and d_v blocks of the state pass: 64×64 tiles, 32-wide d_v tiles when 64 leaves the
    GPU with fewer than two programs per multiprocessor (the pass is sequential in time, so
    its programs are all the parallelism there is). Not narrower: every d_v program reloads
    the chunk's k and Γ tiles, and a 16-wide dot wastes the tensor cores."""
    BK = min(64, pow2_at_least(K))
    BV = min(64, pow2_at_least(V))
    while BV > 32 and triton.cdiv(K, BK) * triton.cdiv(V, BV) * programs_per_block < 2 * sm_count(device):
        BV //= 2
    return BK, BV


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    h0: torch.Tensor | None,
    scale: float,
    reverse: bool,
    cu: list[int] | None,
    cu_dev: torch.Tensor | None,
    ht_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Contiguous ``[B, T, H, D]`` inputs (float32/16/bf16), ``g`` with d_k or 1 columns or None,
    ``g_gamma`` float32 ``[Hkv]`` or None; returns ``(o, final state or None)``."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    dev = q.device
    N = B if cu is None else len(cu) - 1
    varlen = cu is not None
    if varlen:
        table, offsets, NT_all = _chunk_table(cu, dev)
        grid_c, grid_b = NT_all, 1
    else:
        table = offsets = None
        NT_all = B * triton.cdiv(T, BT)
        grid_c, grid_b = triton.cdiv(T, BT), B

    o = new_buffer((B, T, HQ, V), q.dtype, dev)
    ht = new_buffer((N, H, K, V), ht_dtype, dev) if ht_dtype is not None else None
    use_g = g is not None or g_gamma is not None
    head_gate = g is None or g.shape[3] == 1
    KG = 1 if head_gate else K
    ieee = q.dtype == torch.float32
    fit_fp16 = q.dtype == torch.float16
    upcast = q.dtype == torch.bfloat16 and interpreting()
    flags = dict(REVERSE=reverse, IS_VARLEN=varlen)

    gc = None
    if use_g:
        gc = new_buffer((B, T, H, KG), torch.float32, dev)
        if grid_c > 0 and T > 0:
            _gate_cumsum_kernel[(grid_c * grid_b * H,)](
                g, g_gamma, gc, cu_dev, table, T, grid_c,
                H=H, KG=KG, BKG=min(64, pow2_at_least(KG)), BT=BT,
                HAS_G=g is not None, HAS_GAMMA=g_gamma is not None, **flags,
            )

    h = new_buffer((max(NT_all, 1), H, K, V), torch.float32, dev)
    BK, BV = _state_blocks(K, V, N * H, dev)
    _chunk_state_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV) * N * H,)](
        k, v, gc, h0, h, ht, cu_dev, offsets, T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=use_g, HEAD_GATE=head_gate, USE_H0=h0 is not None, STORE_HT=ht is not None, IEEE=ieee, UPCAST=upcast,
        **flags,
    )
    if grid_c == 0 or T == 0:
        return o, ht

    A = new_buffer((B, T, HQ, BT), torch.float32, dev)
    _chunk_scores_kernel[(grid_c * (BT // BC) * grid_b * HQ,)](
        q, k, gc, A, cu_dev, table, T, grid_c,
        HQ=HQ, H=H, K=K, BT=BT, BC=BC, BK=min(64, pow2_at_least(K)), BKD=16,
        USE_G=use_g, HEAD_GATE=head_gate, **flags,
    )
    BK = min(64, pow2_at_least(K))
    BV = min(32 if ieee else 64, pow2_at_least(V))
    _chunk_output_kernel[(triton.cdiv(V, BV) * grid_c * grid_b * HQ,)](
        q, v, gc, h, A, o, cu_dev, table, scale, T, grid_c,
        HQ=HQ, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=use_g, HEAD_GATE=head_gate, IEEE=ieee, FIT_FP16=fit_fp16, UPCAST=upcast, **flags,
        # four 64-wide float32 tiles are live (q ⊙ exp(Γ), the state, A, the output): eight
        # warps, and narrower d_v tiles for the exact float32 dots that run on FMA units,
        # keep ptxas from spilling on sm_80..sm_90
        num_warps=8,
    )
    return o, ht
