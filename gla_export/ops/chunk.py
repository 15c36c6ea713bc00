"""The chunked matrix form of GLA in plain PyTorch: fast on the CPU and differentiable.

The sequence is cut into chunks of ``C`` steps. With ``Γ`` the running sum of the log decay
inside a chunk (``Γ_C`` its total), everything becomes matrix products whose exponentials are
all ``≤ 1`` for a decay ``g ≤ 0``, so nothing overflows:

- state carried in:   ``o_i += scale · (q_i ⊙ exp(Γ_i)) S``
- inside the chunk:   ``o_i += scale · Σ_{j≤i} (q_i · (k_j ⊙ exp(Γ_i − Γ_j))) v_j``
- state carried out:  ``S ← exp(Γ_C) ⊙ S + Σ_j (k_j ⊙ exp(Γ_C − Γ_j))ᵀ v_j``

The inner sum uses sub-chunks of ``SUB`` steps: between two different sub-chunks the factor
is split at the first step of the later one (both halves ``≤ 1``); on the diagonal it is
computed per pair. Chunks are processed all at once except for the scan of the carried state.
Ragged batches (``cu_seqlens``) are padded with ``k = 0, g = 0`` (which leave the state alone)
and ``reverse`` flips time, so the core only ever runs forward over a dense batch.

This is also the body of the ``decomposed`` ONNX export (gla_export.export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import GLADims, acc_dtype, check_inputs, default_scale, state_dtype

CHUNK = 64
SUB = 16


def intra_chunk_scores(qc: torch.Tensor, kc: torch.Tensor, Gc: torch.Tensor, sub: int = SUB) -> torch.Tensor:
    """Causal scores inside each chunk, ``A[i, j] = q_i · (k_j ⊙ exp(Γ_i − Γ_j))`` for ``j ≤ i``.

    qc: ``[..., G, C, K]`` (G query heads per key/value head), kc and Gc: ``[..., C, K]``.
    Returns ``[..., G, C, C]``, zero above the diagonal.
    """
    *lead, Gq, C, K = qc.shape
    ns, s = C // sub, sub
    qs = qc.reshape(*lead, Gq, ns, s, K)
    ks = kc.reshape(*lead, ns, s, K)
    Gs = Gc.reshape(*lead, ns, s, K)
    Gn = Gs[..., :, :1, :]  # [..., ns, 1, K]: the first step of each sub-chunk

    # between sub-chunks a > b: split exp(Γ_i − Γ_j) at the first step n of sub-chunk a
    q_scaled = qs * torch.exp(Gs - Gn).unsqueeze(-4)  # [..., G, ns, s, K]
    # pairs a <= b are masked below; their exponent is zeroed first so that it cannot overflow (the
    # used pairs keep theirs exactly: a positive log-gate is computed as the formula says)
    a_idx = torch.arange(ns, device=qc.device)
    below_b = a_idx[:, None] > a_idx[None, :]  # [ns_a, ns_b]
    expo = torch.where(below_b[:, :, None, None], Gn.unsqueeze(-3) - Gs.unsqueeze(-4), 0.0)  # [..., ns_a, ns_b, s, K]
    k_scaled = ks.unsqueeze(-4) * torch.exp(expo)
    A_off = torch.einsum("...gaik,...abjk->...gaibj", q_scaled, k_scaled)  # [..., G, ns, s, ns, s]
    below = below_b.to(A_off.dtype)
    A = A_off * below[:, None, :, None]

    # on the diagonal sub-chunk: one column at a time, exactly
    i_idx = torch.arange(s, device=qc.device)
    diag = []
    for j in range(s):
        causal = (i_idx >= j)[:, None]  # rows i >= j are used; the others are zeroed below
        expo_j = torch.where(causal, Gs - Gs[..., j : j + 1, :], 0.0).unsqueeze(-4)  # [..., 1, ns, s, K]
        col = (qs * ks[..., j : j + 1, :].unsqueeze(-4) * torch.exp(expo_j)).sum(-1)  # [..., G, ns, s]
        diag.append(col * (i_idx >= j).to(col.dtype))
    A_diag = torch.stack(diag, dim=-1)  # [..., G, ns, s, s]
    eye = torch.eye(ns, dtype=A.dtype, device=qc.device)
    A = A + A_diag.unsqueeze(-2) * eye[:, None, :, None]
    return A.reshape(*lead, Gq, C, C)


def _chunk_forward_dense(q, k, v, g, scale, h0, chunk: int):
    """Forward over a dense batch; T is a multiple of ``chunk``; g already has d_k columns."""
    B, T, Hq, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    Gq, NC = Hq // Hkv, T // chunk

    qc = q.reshape(B, NC, chunk, Hkv, Gq, K).permute(0, 3, 1, 4, 2, 5)  # [B,Hkv,NC,G,C,K]
    kc = k.reshape(B, NC, chunk, Hkv, K).permute(0, 3, 1, 2, 4)  # [B,Hkv,NC,C,K]
    vc = v.reshape(B, NC, chunk, Hkv, V).permute(0, 3, 1, 2, 4)  # [B,Hkv,NC,C,V]
    gc = g.reshape(B, NC, chunk, Hkv, K).permute(0, 3, 1, 2, 4)
    Gc = gc.cumsum(-2)
    Gl = Gc[..., -1:, :]  # [B,Hkv,NC,1,K]

    # each chunk's own contribution to the state, then the scan that carries it across chunks
    dS = (kc * torch.exp(Gl - Gc)).transpose(-1, -2) @ vc  # [B,Hkv,NC,K,V]
    decay = torch.exp(Gl).transpose(-1, -2)  # [B,Hkv,NC,K,1]
    S = h0
    starts = []
    for c in range(NC):
        starts.append(S)
        S = decay[:, :, c] * S + dS[:, :, c]
    S_start = torch.stack(starts, dim=2)  # [B,Hkv,NC,K,V]

    o = (qc * torch.exp(Gc).unsqueeze(-3)) @ S_start.unsqueeze(-3)  # [B,Hkv,NC,G,C,V]
    o = o + intra_chunk_scores(qc, kc, Gc) @ vc.unsqueeze(-3)
    o = (o * scale).permute(0, 2, 4, 1, 3, 5).reshape(B, T, Hq, V)
    return o, S


def _pad_time(x: torch.Tensor, T_to: int) -> torch.Tensor:
    return x if x.shape[1] == T_to else F.pad(x, (0, 0, 0, 0, 0, T_to - x.shape[1]))


def _unpack(x: torch.Tensor, cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, T, ...]`` packed sequences -> ``[N, Lmax, ...]`` right-padded with zeros, and the mask."""
    lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    L = max(lens + [1])
    t = torch.arange(L, device=x.device)
    starts = torch.tensor(cu[:-1], device=x.device)
    lens_t = torch.tensor(lens, device=x.device)
    mask = t[None, :] < lens_t[:, None]  # [N, L]
    idx = (starts[:, None] + t[None, :]).clamp_max(max(cu[-1] - 1, 0))
    out = x[0][idx] if x.shape[1] > 0 else x.new_zeros(len(lens), L, *x.shape[2:])
    return out * mask[..., None, None].to(out.dtype), mask


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    g_gamma: torch.Tensor | None = None,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK,
    *,
    _dims: GLADims | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dims = _dims or check_inputs(q, k, v, g, initial_state, g_gamma, cu_seqlens)
    if chunk_size % SUB != 0:
        raise ValueError(f"chunk_size must be a multiple of {SUB}, got {chunk_size}")
    acc = acc_dtype(q, initial_state)
    scale = default_scale(scale, dims.K)

    q_, k_, v_ = (x.to(acc) for x in (q, k, v))
    g_ = torch.zeros_like(k_) if g is None else g.to(acc).expand(-1, -1, -1, dims.K)
    if g_gamma is not None:
        g_ = g_ + g_gamma.to(acc)[None, None, :, None]

    if cu_seqlens is not None:
        cu = [int(x) for x in cu_seqlens.detach().cpu().tolist()]
        (q_, mask), (k_, _), (v_, _), (g_, _) = (_unpack(x, cu) for x in (q_, k_, v_, g_))
    if reverse:
        q_, k_, v_, g_ = (x.flip(1) for x in (q_, k_, v_, g_))

    Bd, Td = q_.shape[:2]
    T_pad = -(-Td // chunk_size) * chunk_size
    q_, k_, v_, g_ = (_pad_time(x, T_pad) for x in (q_, k_, v_, g_))
    h0 = torch.zeros(Bd, dims.Hkv, dims.K, dims.V, dtype=acc, device=q.device)
    if initial_state is not None:
        h0 = h0 + initial_state.to(acc)

    o, ht = _chunk_forward_dense(q_, k_, v_, g_, scale, h0, chunk_size)
    o = o[:, :Td]
    if reverse:
        o = o.flip(1)
    if cu_seqlens is not None:
        o = o[mask].unsqueeze(0)  # back to [1, T, Hq, V], in packed order
    o = o.to(q.dtype)
    return o, (ht.to(state_dtype(initial_state, acc)) if output_final_state else None)
