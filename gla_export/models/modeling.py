"""The GLA causal language model, parameter for parameter flash-linear-attention's ``GLAForCausalLM``.

Module names, parameter names and shapes match fla 0.6, so an fla checkpoint's state dict loads
unchanged (gla_export.models.loader). The arithmetic is plain PyTorch; the recurrence goes through
:func:`gla_export.ops.gated_linear_attention`, whose state is kept per key/value head (fla repeats
k and v over the query heads instead; with GQA both give the same outputs).

Recurrent inference: every layer takes and returns a :class:`LayerState` (the GLA state
``[B, Hkv, d_k, d_v]`` and, with short convolutions, the last ``conv_size - 1`` inputs of the q, k
and v convolutions ``[B, conv_channels, conv_size - 1]``). Padded batches must be left-padded:
a position with ``attention_mask == 0`` gets ``k = 0`` and ``g = 0`` (it leaves the state alone)
and is cut out of the convolution windows (the row's cached inputs move up to its first real
token), so each row gets the logits and the states it would get run alone, whether it starts
a context or continues one.

Hybrid models (config ``attn``): the listed layers are fla's softmax ``Attention`` (q/k/v/o
projections, optional q/k/v bias, GQA, rotary embedding on q and k, causal attention, optional
sliding window). Their state is a KV cache of rotated keys and values ``[B, Hkv, L, d]`` and the
number of real tokens each row has seen (``position [B]``: the rotary position of its next token).
A full-attention layer's cache grows by one position per token (``L`` = tokens so far, padding
included); a windowed layer's cache always holds ``W`` positions (the newest last; zeros, masked
out, until W tokens are seen). Window semantics as fla passes ``window_size`` W to flash-attn
(``window_size=(W-1, 0)``): the query at position p sees the keys at positions p-W+1 .. p, i.e.
W keys including its own. Padding (left) is moved out of the cache as with the convolutions: the
row's previous cache is moved right onto the padded positions, so its real keys stay contiguous
at the end and slot distance is position distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import gated_linear_attention
from .config import GLAConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back to the input dtype (as fla's kernels do)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True, dtype=None):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """``rmsnorm(x) · weight · silu(gate)``: fla's ``FusedRMSNormGated`` with the swish gate."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (rms_norm(x, self.weight, self.eps).float() * F.silu(gate.float())).to(x.dtype)


class ShortConvolution(nn.Conv1d):
    """Depthwise causal convolution + SiLU; parameters as fla's ``ShortConvolution`` (an nn.Conv1d)."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False):
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1, groups=hidden_size, bias=bias)

    def forward_with_cache(
        self, x: torch.Tensor, cache: torch.Tensor | None, pad: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``[B, T, D]``; cache: the previous ``kernel_size - 1`` inputs ``[B, D, W-1]`` (zeros if None);
        pad: ``[B]`` number of left-padding positions of each row (None: no padding).

        With padding, each row's window sees ``[cache, real tokens]``: the padded positions are cut
        out and the cache moved right next to the row's first real token (see :func:`close_left_padding`).
        """
        B, T, D = x.shape
        W = self.kernel_size[0]
        xt = x.transpose(1, 2)
        if cache is None:
            cache = xt.new_zeros(B, D, W - 1)
        full = torch.cat([cache.to(xt.dtype), xt], dim=-1)  # [B, D, W-1+T]
        if pad is not None:
            full = close_left_padding(full, pad, W - 1)
        y = F.conv1d(full, self.weight, self.bias, groups=D)  # [B, D, T]
        return F.silu(y).transpose(1, 2), full[..., full.shape[-1] - (W - 1) :]


def close_left_padding(full: torch.Tensor, pad: torch.Tensor, n_cache: int) -> torch.Tensor:
    """``full = [cache, x]`` ``[B, D, n_cache + T]`` where the first ``pad[b]`` positions of row b's
    ``x`` are padding: move the cache right by ``pad[b]`` onto the padding (zeros enter on the
    left), so that the cache sits right before the row's real tokens, which keep their places.

    A convolution over the result gives every real token the window it would have had with the
    row run alone, and the last ``n_cache`` columns are the row's new cache (the old cache for a
    row that is all padding).
    """
    L = full.shape[-1]
    j = torch.arange(L, device=full.device)
    shift = pad.to(device=full.device, dtype=j.dtype)[:, None]  # [B, 1]
    src = torch.where(j < n_cache + shift, j - shift, j)  # [B, L]; < 0 where zeros enter
    gathered = full.gather(-1, src.clamp_min(0)[:, None, :].expand(-1, full.shape[1], -1))
    return gathered * (src >= 0)[:, None, :].to(full.dtype)


@dataclass
class LayerState:
    recurrent: torch.Tensor | None = None  # GLA: [B, Hkv, d_k, d_v]
    conv: torch.Tensor | None = None  # GLA with short convolutions: [B, conv_channels, conv_size - 1]
    key: torch.Tensor | None = None  # attention: rotated keys [B, Hkv, L, d]
    value: torch.Tensor | None = None  # attention: values [B, Hkv, L, d]
    position: torch.Tensor | None = None  # attention: real tokens seen per row [B] int64


# a graph state's kind (docs/export.md) -> the LayerState field that holds it
STATE_FIELDS = {"recurrent_state": "recurrent", "conv_state": "conv", "key": "key", "value": "value", "position": "position"}


def state_tensor(states: list[LayerState], layer: int | None, kind: str) -> torch.Tensor:
    """The tensor of one graph state in ``states`` (``layer`` None: the shared position, which
    every attention layer's LayerState carries)."""
    if layer is None:
        return next(s.position for s in states if s.position is not None)
    return getattr(states[layer], STATE_FIELDS[kind])


def layer_states(num_layers: int, tensors: list[tuple[int | None, str, torch.Tensor]]) -> list[LayerState]:
    """LayerStates from graph states ``(layer, kind, tensor)`` (the inverse of :func:`state_tensor`)."""
    states = [LayerState() for _ in range(num_layers)]
    shared = [t for layer, _, t in tensors if layer is None]
    for layer, kind, t in tensors:
        if layer is not None:
            setattr(states[layer], STATE_FIELDS[kind], t)
    for s in states:
        if s.key is not None and shared:
            s.position = shared[0]
    return states


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's ``RotaryEmbedding`` tables at ``positions`` (any shape): ``cos, sin [..., head_dim/2]``
    in float32, from ``inv_freq = 1 / theta^(2i/d)`` and float32 positions."""
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cos(freqs), torch.sin(freqs)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotation (fla's default, ``interleaved=False``) of ``x [B, T, H, d]`` by ``cos/sin
    [B, T, d/2]`` (rounded to x's dtype first, as fla caches them), computed in float32."""
    c, s = cos.to(x.dtype).float()[:, :, None], sin.to(x.dtype).float()[:, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def attention_key_mask(position: torch.Tensor, n_real: torch.Tensor, L: int, T: int, window: int | None) -> torch.Tensor:
    """Which of the ``L + T`` cache slots (past then new, padding closed) each of the T new queries
    may see: ``[B, T, L + T]`` bool. Query t sits in slot ``L + t``; a slot holds a real key when it
    is among the row's last ``position + n_real`` slots; causal; within the window (W keys, its own
    included). A query always sees its own slot, so a padded query's softmax has one finite score
    (its output is unused; this only keeps NaN out of the graph)."""
    j = torch.arange(L + T, device=position.device)
    qi = (L + torch.arange(T, device=position.device))[:, None]  # [T, 1]
    seen = (position + n_real)[:, None, None]  # [B, 1, 1]
    ok = (j[None, None, :] >= L + T - seen) & (j <= qi)[None]
    if window is not None:
        ok = ok & (qi - j < window)[None]
    return ok | (j == qi)[None]


class Attention(nn.Module):
    """fla's softmax ``Attention`` layer (fla/layers/attn.py) as a hybrid model builds it: parameter
    names and shapes the same (no q/k norm; the rotary tables are not parameters)."""

    def __init__(self, config: GLAConfig, layer_idx: int):
        super().__init__()
        spec = config.attention_spec(layer_idx)
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = spec["num_heads"], spec["num_kv_heads"]
        self.head_dim = config.attention_head_dim(layer_idx)
        self.window_size, self.rope_theta = spec["window_size"], float(spec["rope_theta"])
        kv_dim = self.num_kv_heads * self.head_dim
        bias = spec["qkv_bias"]
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def cache_length(self) -> int:
        """Positions of an empty context's cache: W for a windowed layer, 0 for full attention."""
        return self.window_size or 0

    def empty_state(self, batch_size: int, device=None, dtype=None) -> LayerState:
        """The state of an empty context: a zero cache of :meth:`cache_length` positions, position 0."""
        shape = (batch_size, self.num_kv_heads, self.cache_length(), self.head_dim)
        return LayerState(key=torch.zeros(shape, device=device, dtype=dtype),
                          value=torch.zeros(shape, device=device, dtype=dtype),
                          position=torch.zeros(batch_size, dtype=torch.int64, device=device))

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: LayerState | None = None,
        gla_backend: str = "auto",
    ) -> tuple[torch.Tensor, LayerState]:
        B, T, _ = x.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, d)
        k = self.k_proj(x).view(B, T, Hkv, d)
        v = self.v_proj(x).view(B, T, Hkv, d)
        if state is None or state.key is None:
            state = self.empty_state(B, x.device, x.dtype)
        past_k, past_v, position = state.key.to(x.dtype), state.value.to(x.dtype), state.position.to(x.device)
        L = past_k.shape[2]
        if attention_mask is None:
            m = None
            n_real = torch.full((B,), T, dtype=torch.int64, device=x.device)
            pos = position[:, None] + torch.arange(T, device=x.device)
        else:
            m = attention_mask[:, -T:].to(torch.int64)
            n_real = m.sum(-1)
            pos = position[:, None] + m.cumsum(-1) - 1
        cos, sin = rotary_cos_sin(pos, d, self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        full_k = torch.cat([past_k, k.transpose(1, 2)], dim=2)  # [B, Hkv, L+T, d]
        full_v = torch.cat([past_v, v.transpose(1, 2)], dim=2)
        if m is not None and L > 0:  # padding out of the cache: [B, C=Hkv·d, L+T] for close_left_padding
            pad = T - n_real

            def close(t):
                flat = t.permute(0, 1, 3, 2).reshape(B, Hkv * d, L + T)
                return close_left_padding(flat, pad, L).view(B, Hkv, d, L + T).permute(0, 1, 3, 2)

            full_k, full_v = close(full_k), close(full_v)
        if m is not None:  # the padded slots are now the row's first `pad` ones: zero them
            keep = torch.arange(L + T, device=x.device)[None] >= (T - n_real)[:, None]
            full_k = full_k * keep[:, None, :, None].to(full_k.dtype)
            full_v = full_v * keep[:, None, :, None].to(full_v.dtype)
        ok = attention_key_mask(position, n_real, L, T, self.window_size)  # [B, T, L+T]

        G = H // Hkv
        qf = q.transpose(1, 2).float()  # [B, H, T, d]
        kf = full_k.float().repeat_interleave(G, dim=1)
        vf = full_v.float().repeat_interleave(G, dim=1)
        o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=ok[:, None], scale=d ** -0.5)
        o = self.o_proj(o.transpose(1, 2).reshape(B, T, H * d).to(x.dtype))

        new_k, new_v = full_k, full_v
        if self.window_size is not None:
            new_k, new_v = full_k[:, :, -self.window_size:], full_v[:, :, -self.window_size:]
        return o, LayerState(key=new_k.contiguous(), value=new_v.contiguous(), position=position + n_real)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    states: list[LayerState] | None = None


class GatedLinearAttention(nn.Module):
    def __init__(self, config: GLAConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.num_heads, self.num_kv_heads = c.num_heads, c.kv_heads
        self.head_k_dim, self.head_v_dim = c.head_k_dim, c.head_v_dim
        self.q_proj = nn.Linear(c.hidden_size, c.key_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.value_dim_per_group, bias=False)
        if c.use_output_gate:
            self.g_proj = nn.Linear(c.hidden_size, c.value_dim, bias=False)
        if c.use_short_conv:
            self.q_conv1d = ShortConvolution(c.key_dim, c.conv_size, c.conv_bias)
            self.k_conv1d = ShortConvolution(c.key_dim_per_group, c.conv_size, c.conv_bias)
            self.v_conv1d = ShortConvolution(c.value_dim_per_group, c.conv_size, c.conv_bias)
        self.gk_proj = nn.Sequential(
            nn.Linear(c.hidden_size, c.gate_low_rank_dim, bias=False),
            nn.Linear(c.gate_low_rank_dim, c.key_dim_per_group, bias=True),
        )
        self.o_proj = nn.Linear(c.value_dim, c.hidden_size, bias=False)
        affine = c.elementwise_affine is not False
        if c.fuse_norm_and_gate:
            self.g_norm_swish_gate = GatedRMSNorm(c.head_v_dim, c.norm_eps, affine)
        else:
            self.g_norm = RMSNorm(c.head_v_dim, c.norm_eps, affine, dtype=torch.float32)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The log decay per key dimension, ``logsigmoid(gk_proj(x)) / normalizer`` clamped at clamp_min."""
        gk = F.logsigmoid(self.gk_proj(x).float()) / self.config.gate_logit_normalizer
        if self.config.clamp_min is not None:
            gk = gk.clamp_min(self.config.clamp_min)
        return gk

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: LayerState | None = None,
        gla_backend: str = "auto",
    ) -> tuple[torch.Tensor, LayerState]:
        c = self.config
        B, T, _ = x.shape
        mask = None if attention_mask is None else attention_mask[:, -T:, None].to(x.dtype)
        xin = x if mask is None else x * mask

        q, k, v = self.q_proj(xin), self.k_proj(xin), self.v_proj(xin)
        conv_state = None
        if c.use_short_conv:
            prev = None if state is None else state.conv
            splits = (c.key_dim, c.key_dim_per_group, c.value_dim_per_group)
            caches = (None, None, None) if prev is None else torch.split(prev, splits, dim=1)
            # a zero cache needs no closing of the padding: the padded inputs are zeros already
            pad = None if mask is None or prev is None else T - attention_mask[:, -T:].sum(-1)
            q, cq = self.q_conv1d.forward_with_cache(q, caches[0], pad)
            k, ck = self.k_conv1d.forward_with_cache(k, caches[1], pad)
            v, cv = self.v_conv1d.forward_with_cache(v, caches[2], pad)
            conv_state = torch.cat([cq, ck, cv], dim=1)
        gk = self.gate(x)
        if mask is not None:
            k = k * mask
            gk = gk * mask.float()

        q = q.view(B, T, self.num_heads, self.head_k_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_k_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_v_dim)
        gk = gk.view(B, T, self.num_kv_heads, self.head_k_dim)
        o, recurrent = gated_linear_attention(
            q,
            k,
            v,
            gk,
            initial_state=None if state is None else state.recurrent,
            output_final_state=True,
            backend=gla_backend,
        )

        if c.use_output_gate:
            g = self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim)
            if c.fuse_norm_and_gate:
                o = self.g_norm_swish_gate(o, g)
            else:
                o = self.g_norm(o) * F.silu(g)
        else:
            o = self.g_norm(o)
        o = self.o_proj(o.reshape(B, T, -1).to(x.dtype))
        return o, LayerState(recurrent, conv_state)


class GLAMLP(nn.Module):
    """SwiGLU MLP, fla's ``GatedMLP``."""

    def __init__(self, config: GLAConfig):
        super().__init__()
        size = config.mlp_intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GLABlock(nn.Module):
    def __init__(self, config: GLAConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        is_attn = config.attention_spec(layer_idx) is not None
        self.attn = Attention(config, layer_idx) if is_attn else GatedLinearAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GLAMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, attention_mask=None, state=None, gla_backend="auto"):
        h, new_state = self.attn(self.attn_norm(x), attention_mask, state, gla_backend)
        x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, new_state


class GLAModel(nn.Module):
    def __init__(self, config: GLAConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([GLABlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


def _check_left_padded(attention_mask: torch.Tensor, ids_shape: torch.Size) -> None:
    """The short convolutions take padding out of their windows by position (the first
    ``T - sum(mask)`` positions of a row), so any other mask would silently mix up the windows."""
    B, T = ids_shape
    m = attention_mask
    if m.dim() != 2 or m.shape[0] != B or m.shape[1] < T:
        raise ValueError(f"attention_mask (shape {list(m.shape)}) must be [batch, >= {T}] for input_ids of shape {[B, T]}")
    m = m[:, -T:]
    if ((m != 0) & (m != 1)).any() or (m[:, 1:] < m[:, :-1]).any():
        raise ValueError(f"attention_mask (shape {list(attention_mask.shape)}) must hold 0s then 1s in each row: "
                         "padding goes on the left")


class GLAForCausalLM(nn.Module):
    """``forward(input_ids, attention_mask=None, states=None)`` -> :class:`CausalLMOutput`."""

    def __init__(self, config: GLAConfig):
        super().__init__()
        self.config = config
        self.model = GLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def reset_parameters(self) -> None:
        """fla's initialisation: normal(0, initializer_range) for linear and embedding weights."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        states: list[LayerState] | None = None,
        gla_backend: str = "auto",
    ) -> CausalLMOutput:
        if states is not None and len(states) != len(self.model.layers):
            raise ValueError(f"expected {len(self.model.layers)} layer states, got {len(states)}")
        if attention_mask is not None and (self.config.use_short_conv or self.config.attn is not None):
            _check_left_padded(attention_mask, input_ids.shape)
        x = self.model.embeddings(input_ids)
        new_states = []
        for i, layer in enumerate(self.model.layers):
            x, st = layer(x, attention_mask, None if states is None else states[i], gla_backend)
            new_states.append(st)
        logits = self.lm_head(self.model.norm(x))
        return CausalLMOutput(logits=logits, states=new_states)

    def init_states(self, batch_size: int, device=None, state_dtype: torch.dtype = torch.float32) -> list[LayerState]:
        """Zero states for ``batch_size`` rows (the state of an empty context)."""
        c = self.config
        dtype = self.lm_head.weight.dtype
        states = []
        for layer in self.model.layers:
            a = layer.attn
            if isinstance(a, Attention):
                states.append(a.empty_state(batch_size, device, dtype))
                continue
            states.append(LayerState(
                torch.zeros(batch_size, c.kv_heads, c.head_k_dim, c.head_v_dim, device=device, dtype=state_dtype),
                torch.zeros(batch_size, c.conv_channels, c.conv_size - 1, device=device, dtype=dtype)
                if c.use_short_conv
                else None,
            ))
        return states
