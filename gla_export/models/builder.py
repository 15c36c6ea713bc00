"""Builders and size helpers: make a GLA model from the usual knobs, count it, pick defaults.

``build_model`` speaks the vocabulary of model-zoo builders (``embed_dim``, ``hidden_size``,
``num_layers``, ``num_heads``, ``head_dim``, ``expand_k``, ``expand_v``, ``dropout``) and maps it
onto fla's ``GLAConfig``:

- ``embed_dim``: the model width (fla's ``hidden_size``: embeddings, residual stream);
- ``hidden_size``: the MLP's inner width (fla's ``intermediate_size``); default fla's rounding
  of 2/3 · 4 · embed_dim up to a multiple of 256;
- ``head_dim``: d_k per head; with it, ``expand_k = num_heads · head_dim / embed_dim`` and d_v is
  ``head_dim · expand_v / expand_k`` (twice d_k with the default expansions 0.5 and 1.0);
- ``expand_k``/``expand_v``: key and value widths over the model width, as in fla;
- ``attn``: softmax-attention layers among the GLA layers (a hybrid): fla's attention spec, a dict
  or a list of dicts with ``layers``, ``num_heads`` and optionally ``num_kv_heads``, ``qkv_bias``,
  ``window_size``, ``rope_theta`` (see :func:`attention_spec`).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .config import ConfigError, GLAConfig
from .modeling import GLAForCausalLM

# sizes of the published GLA models (Yang et al. 2024, fla-hub) and a tiny one for tests
RECOMMENDED: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_heads=2),
    "sample": dict(vocab_size=258, hidden_size=256, num_hidden_layers=4, num_heads=4, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True),
    # the hybrid sample (samples/hybrid-model): half the sample's width, layers 1 and 3 softmax
    # attention over a sliding window of 64 bytes (GQA 4/2, head 32), so it decodes in constant
    # memory; "sample-small" is the same shape with GLA everywhere, the comparison it is scored against
    "hybrid-sample": dict(vocab_size=258, hidden_size=128, num_hidden_layers=4, num_heads=2, bos_token_id=256,
                          eos_token_id=257, tie_word_embeddings=True,
                          attn=dict(layers=[1, 3], num_heads=4, num_kv_heads=2, window_size=64, qkv_bias=False,
                                    rope_theta=10000.0)),
    "sample-small": dict(vocab_size=258, hidden_size=128, num_hidden_layers=4, num_heads=2, bos_token_id=256,
                         eos_token_id=257, tie_word_embeddings=True),
    "340M": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_heads=4),
    "1.3B": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_heads=4),
}


def recommended_config(size: str = "340M", **overrides: Any) -> GLAConfig:
    """fla's defaults at one of the sizes in :data:`RECOMMENDED`, with ``overrides`` applied."""
    if size not in RECOMMENDED:
        raise ValueError(f"size must be one of {', '.join(RECOMMENDED)}, got {size!r}")
    return GLAConfig(**{**RECOMMENDED[size], **overrides})


def attention_spec(
    layers: list[int],
    num_heads: int,
    num_kv_heads: int | None = None,
    window_size: int | None = None,
    qkv_bias: bool = False,
    rope_theta: float = 10000.0,
) -> dict[str, Any]:
    """One entry of fla's ``attn`` field: softmax attention at ``layers`` (a sliding window of
    ``window_size`` keys, the query's own included, or full causal attention when None)."""
    return dict(layers=list(layers), num_heads=num_heads, num_kv_heads=num_kv_heads if num_kv_heads is not None else num_heads,
                qkv_bias=qkv_bias, window_size=window_size, rope_theta=rope_theta)


def make_config(
    vocab_size: int = 256,
    embed_dim: int = 256,
    hidden_size: int | None = None,
    num_layers: int = 4,
    num_heads: int = 4,
    head_dim: int | None = None,
    expand_k: float = 0.5,
    expand_v: float = 1.0,
    dropout: float = 0.0,
    attn: dict | list[dict] | None = None,
    **overrides: Any,
) -> GLAConfig:
    """A :class:`GLAConfig` from builder-style arguments (see the module docstring)."""
    if head_dim is not None:
        if head_dim <= 0:
            raise ConfigError(f"head_dim must be positive, got {head_dim}")
        ratio = expand_v / expand_k
        expand_k = num_heads * head_dim / embed_dim
        expand_v = expand_k * ratio
    return GLAConfig(
        vocab_size=vocab_size,
        hidden_size=embed_dim,
        intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_heads=num_heads,
        expand_k=expand_k,
        expand_v=expand_v,
        dropout=dropout,
        attn=attn,
        **overrides,
    )


def build_model(**kwargs: Any) -> GLAForCausalLM:
    """A freshly initialised :class:`GLAForCausalLM`; arguments as :func:`make_config`."""
    return GLAForCausalLM(make_config(**kwargs))


def count_parameters(model_or_config: nn.Module | GLAConfig, trainable_only: bool = False) -> int:
    """Number of parameters; a tied embedding/lm_head is counted once."""
    if isinstance(model_or_config, GLAConfig):
        import torch

        with torch.device("meta"):
            model_or_config = GLAForCausalLM(model_or_config)
    seen, total = set(), 0
    for p in model_or_config.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def output_size(config: GLAConfig) -> int:
    """Width of the model's output (logits per position): the vocabulary size."""
    return config.vocab_size


def state_shapes(config: GLAConfig, batch_size: int = 1, layer: int | None = None,
                 context: int = 0) -> dict[str, tuple[int, ...]]:
    """Shape of every state of one layer for ``batch_size`` rows: a GLA layer's (the first GLA
    layer's when ``layer`` is None), or an attention layer's KV cache after ``context`` tokens
    (``key``/``value``: W positions when windowed, ``context`` otherwise) and ``position``."""
    spec = None if layer is None else config.attention_spec(layer)
    if spec is not None:
        kv = (batch_size, spec["num_kv_heads"], spec["window_size"] or context, config.attention_head_dim(layer))
        return {"key": kv, "value": kv, "position": (batch_size,)}
    shapes = {"recurrent_state": (batch_size, config.kv_heads, config.head_k_dim, config.head_v_dim)}
    if config.use_short_conv:
        shapes["conv_state"] = (batch_size, config.conv_channels, config.conv_size - 1)
    return shapes
