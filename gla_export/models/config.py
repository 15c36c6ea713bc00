"""GLA model configuration, field for field flash-linear-attention's ``GLAConfig`` (fla 0.6).

A checkpoint's ``config.json`` is read into :class:`GLAConfig`. Fields that Hugging Face adds
(``architectures``, ``transformers_version``, ...) are kept in ``extra`` and ignored; a field we
know with a value we cannot run (another activation, attention residuals, ...) raises
:class:`ConfigError` naming the field.

Hybrid models: fla's ``attn`` field (a dict, or a list of dicts) puts softmax-attention layers at
the indices in each spec's ``layers``; :func:`parse_attention` checks and fills it as fla's
``parse_attention_config`` does (``num_kv_heads`` defaults to ``num_heads``, ``qkv_bias`` to False,
``window_size`` to None, ``rope_theta`` to 10000).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field has a value this package cannot run; the message names the field."""


ATTENTION_KEYS = ("layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta")


def parse_attention(attn: Any, num_hidden_layers: int, hidden_size: int) -> dict | list[dict] | None:
    """fla's ``attn`` field checked and with its defaults filled (dict stays dict, list stays list).

    Raises :class:`ConfigError` naming the field for anything fla would refuse and for what fla's
    ``Attention`` layer cannot build (hidden_size not a multiple of num_heads, an odd head_dim that
    the rotary embedding cannot rotate, num_heads not a multiple of num_kv_heads)."""
    if attn is None:
        return None
    if not isinstance(attn, (dict, list)):
        raise ConfigError(f"config field 'attn' = {attn!r}: must be null, an object or a list of objects")
    out, owner = [], {}
    for n, spec in enumerate([attn] if isinstance(attn, dict) else attn):
        where = "config field 'attn'" + ("" if isinstance(attn, dict) else f"[{n}]")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} = {spec!r}: must be an object")
        spec = dict(spec)
        for key in ("layers", "num_heads"):
            if key not in spec:
                raise ConfigError(f"{where}: field '{key}' is required")
        layers = spec["layers"]
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ConfigError(f"{where}.layers = {layers!r}: must be a list of layer indices")
        for i in layers:
            if not 0 <= i < num_hidden_layers:
                raise ConfigError(f"{where}.layers holds {i}: layer indices are in [0, {num_hidden_layers})")
            if i in owner:
                raise ConfigError(f"{where}.layers holds {i}, which is already an attention layer")
            owner[i] = n
        spec["layers"] = list(layers)
        if spec.get("num_kv_heads") is None:
            spec["num_kv_heads"] = spec["num_heads"]
        for key in ("num_heads", "num_kv_heads"):
            v = spec[key]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{where}.{key} = {v!r}: must be a positive integer")
        if spec["num_heads"] % spec["num_kv_heads"]:
            raise ConfigError(f"{where}.num_kv_heads = {spec['num_kv_heads']}: num_heads ({spec['num_heads']}) must be a multiple of it")
        if hidden_size % spec["num_heads"] or (hidden_size // spec["num_heads"]) % 2:
            raise ConfigError(f"{where}.num_heads = {spec['num_heads']}: hidden_size ({hidden_size}) over it must be "
                              "a whole, even head dimension (rotary embedding)")
        if not isinstance(spec.setdefault("qkv_bias", False), bool):
            raise ConfigError(f"{where}.qkv_bias = {spec['qkv_bias']!r}: must be true or false")
        w = spec.setdefault("window_size", None)
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ConfigError(f"{where}.window_size = {w!r}: must be a positive integer or null")
        theta = spec.setdefault("rope_theta", 10000.0)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise ConfigError(f"{where}.rope_theta = {theta!r}: must be positive and finite")
        if spec.get("qk_norm"):
            raise ConfigError(f"{where}.qk_norm: fla's hybrid models do not build q/k norms; not supported")
        out.append(spec)
    return out[0] if isinstance(attn, dict) else out


@dataclass
class GLAConfig:
    # fla's GLAConfig fields and defaults
    vocab_size: int = 32000
    hidden_size: int = 2048
    expand_k: float = 0.5
    expand_v: float = 1.0
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_heads: int = 4
    num_kv_heads: int | None = None
    feature_map: str | None = None
    attn_mode: str = "chunk"
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    clamp_min: float | None = None
    hidden_act: str = "swish"
    max_position_embeddings: int = 2048
    elementwise_affine: bool | None = True
    norm_eps: float = 1e-6
    use_gk: bool = True
    use_gv: bool = False
    attn: dict | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    fuse_norm: bool = True
    fuse_swiglu: bool = True
    fuse_cross_entropy: bool = True
    fuse_linear_cross_entropy: bool = False
    use_l2warp: bool = False
    attnres_block_size: int | None = None
    # fla's GatedLinearAttention layer constants (not GLAConfig fields; read when present)
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16
    conv_bias: bool = False
    # ours: dropout on the residual branches while training (no parameters, ignored by export)
    dropout: float = 0.0
    model_type: str = "gla"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes (the same arithmetic as fla's layers) ----
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def key_dim(self) -> int:
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return round(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.kv_heads

    @property
    def key_dim_per_group(self) -> int:
        return self.key_dim // self.num_kv_groups

    @property
    def value_dim_per_group(self) -> int:
        return self.value_dim // self.num_kv_groups

    @property
    def mlp_intermediate_size(self) -> int:
        """fla's GatedMLP: 2/3 · hidden_ratio · hidden_size rounded up to a multiple of 256."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
        size = int(self.hidden_size * ratio * 2 / 3)
        return 256 * ((size + 256 - 1) // 256)

    @property
    def fuse_norm_and_gate(self) -> bool:
        """Whether fla names the output norm ``g_norm_swish_gate`` (else ``g_norm``)."""
        return self.hidden_act == "swish" and self.fuse_norm and self.use_output_gate

    @property
    def conv_channels(self) -> int:
        """Channels of the short-convolution state (q, k and v convolutions side by side)."""
        return self.key_dim + self.key_dim_per_group + self.value_dim_per_group if self.use_short_conv else 0

    def attention_spec(self, layer_idx: int) -> dict | None:
        """The ``attn`` spec of a softmax-attention layer (None for a GLA layer)."""
        if self.attn is None:
            return None
        for spec in [self.attn] if isinstance(self.attn, dict) else self.attn:
            if layer_idx in spec["layers"]:
                return spec
        return None

    def attention_head_dim(self, layer_idx: int) -> int:
        """The head size of softmax-attention layer ``layer_idx``: hidden_size over its num_heads."""
        return self.hidden_size // self.attention_spec(layer_idx)["num_heads"]

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the softmax-attention layers, ascending."""
        return [i for i in range(self.num_hidden_layers) if self.attention_spec(i) is not None]

    # ---- checks ----
    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        if self.model_type != "gla":
            raise bad("model_type", "only 'gla' models are supported")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        self.attn = parse_attention(self.attn, self.num_hidden_layers, self.hidden_size)
        if self.attnres_block_size is not None:
            raise bad("attnres_block_size", "attention residuals are not supported")
        if self.feature_map is not None:
            raise bad("feature_map", "only None (no feature map) is supported")
        if self.hidden_act != "swish":
            raise bad("hidden_act", "only 'swish' is supported")
        if self.use_gv:
            raise bad("use_gv", "value gates are not supported")
        if not self.use_gk:
            raise bad("use_gk", "GLA needs its key gate")
        if self.num_heads % self.kv_heads != 0:
            raise bad("num_kv_heads", f"num_heads ({self.num_heads}) must be a multiple of it")
        for name, width in (("expand_k", self.hidden_size * self.expand_k), ("expand_v", self.hidden_size * self.expand_v)):
            if not math.isclose(width, round(width)) or round(width) <= 0:
                raise bad(name, f"hidden_size * {name} = {width} must be a positive integer")
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise bad("num_heads", f"key dim {self.key_dim} and value dim {self.value_dim} must divide by it")
        if self.use_short_conv and self.conv_size < 1:
            raise bad("conv_size", "must be at least 1")
        if self.clamp_min is not None and self.clamp_min > 0:
            raise bad("clamp_min", "a log decay is at most 0, so clamp_min must be <= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # None (no such token) or an id in the vocabulary; eos may be a list (HF generation configs)
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) and name == "eos_token_id" else [value]
            if value is None:
                continue
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids) or not ids:
                raise bad(name, f"must be a token id in the vocabulary [0, {self.vocab_size}) or null")

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GLAConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> GLAConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["architectures"] = ["GLAForCausalLM"]
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
