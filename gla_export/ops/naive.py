"""The reference: a per-step loop, slow on purpose and obviously right.

Every other path (the chunked PyTorch form, the Triton kernels, the native CPU/CUDA kernels,
the ONNX graphs) is tested against this function. Per key/value head, with ``S`` of shape
``[d_k, d_v]``::

    S_t = diag(exp(g_t + g_gamma)) · S_{t-1} + k_tᵀ v_t
    o_t = scale · q_t S_t

Query head ``h`` reads the state of key/value head ``h // (Hq // Hkv)``. With ``reverse`` each
sequence is walked from its last position to its first. Accumulation is float32, or float64
when the inputs are float64.
"""

from __future__ import annotations

import torch

from ._common import GLADims, acc_dtype, check_inputs, default_scale, seq_bounds, state_dtype


def naive_gla(
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
    *,
    _dims: GLADims | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # _dims: what gated_linear_attention already validated (it checks once for every backend)
    dims = _dims or check_inputs(q, k, v, g, initial_state, g_gamma, cu_seqlens)
    acc = acc_dtype(q, initial_state)
    scale = default_scale(scale, dims.K)
    G = dims.groups

    q_, k_, v_ = (x.to(acc) for x in (q, k, v))
    g_ = None if g is None else g.to(acc)
    gamma = None if g_gamma is None else g_gamma.to(acc)

    o = torch.zeros(dims.B, dims.T, dims.Hq, dims.V, dtype=acc, device=q.device)
    final = []
    for n, (b, bos, eos) in enumerate(seq_bounds(dims, cu_seqlens)):
        S = torch.zeros(dims.Hkv, dims.K, dims.V, dtype=acc, device=q.device)
        if initial_state is not None:
            S = S + initial_state[n].to(acc)
        steps = range(eos - 1, bos - 1, -1) if reverse else range(bos, eos)
        for t in steps:
            decay = torch.zeros(dims.Hkv, 1, dtype=acc, device=q.device) if g_ is None else g_[b, t]
            if gamma is not None:
                decay = decay + gamma[:, None]
            S = S * torch.exp(decay)[:, :, None] + k_[b, t][:, :, None] * v_[b, t][:, None, :]
            S_per_q_head = S.repeat_interleave(G, dim=0)  # [Hq, d_k, d_v]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q_[b, t], S_per_q_head)
        final.append(S)

    ht = torch.stack(final).to(state_dtype(initial_state, acc)) if output_final_state else None
    return o.to(q.dtype), ht
