"""The metadata of an export: ``metadata.json`` beside the graphs, and the same JSON in each
graph's ``metadata_props`` (key :data:`METADATA_KEY`). docs/export.md is its specification; bump
:data:`FORMAT_VERSION` on any change a runtime could notice.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from .. import __version__
from .._dtypes import FLOAT_NAMES, DTYPES, dtype_name
from ..models.config import GLAConfig
from .gla_ops import CUSTOM_DOMAIN, CUSTOM_OP, CUSTOM_VERSION, ONNX_OP
from .graph import ONNX_TYPE_NAMES
from .model_graph import BATCH, SEQUENCE, GraphSpec, state_specs

FORMAT = "gla-export"
FORMAT_VERSION = 1
METADATA_KEY = "gla_export.metadata"
METADATA_FILE = "metadata.json"
PREFILL_FILE = "prefill.onnx"
STEP_FILE = "step.onnx"
WEIGHTS_FILE = "weights.onnx.data"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def detect_tokenizer(config: GLAConfig, source: Path | None) -> dict[str, Any]:
    """What turns text into ``input_ids`` for this model.

    ``huggingface`` when the checkpoint carries tokenizer files (they are copied into the export),
    ``byte`` for the byte-level vocabulary of the sample model (ids 0-255 are bytes, then BOS and
    EOS), else ``none`` (the runtime must be given ids).
    """
    if source is not None:
        files = [n for n in HF_TOKENIZER_FILES if (source / n).is_file()]
        if files:
            return {"kind": "huggingface", "files": files}
    if config.vocab_size == 258 and config.bos_token_id == 256 and config.eos_token_id == 257:
        return {"kind": "byte", "bos_token_id": 256, "eos_token_id": 257}
    return {"kind": "none"}


def zero_state_feeds(meta: ExportMetadata | dict[str, Any], batch: int = 1) -> dict[str, Any]:
    """Zero initial states for an export's graphs: ``{state input name: zeros}``, with the metadata's
    ``"batch"`` dimension set to ``batch``; a full-attention cache (its symbolic ``"past_sequence"``
    axis) is empty in an empty context."""
    import numpy as np

    from .._dtypes import numpy_dtype

    return {
        st.input: np.zeros([batch if d == "batch" else 0 if isinstance(d, str) else d for d in st.shape],
                           dtype=numpy_dtype(st.dtype))
        for st in as_metadata(meta).states
    }


def copy_tokenizer(tokenizer: dict[str, Any], source: Path | None, out_dir: Path) -> None:
    if tokenizer["kind"] == "huggingface" and source is not None:
        for name in tokenizer["files"]:
            shutil.copy2(source / name, out_dir / name)


def _io(name: str, elem_type: int, shape: list) -> dict[str, Any]:
    return {"name": name, "dtype": ONNX_TYPE_NAMES[elem_type], "shape": list(shape)}


def graph_io(spec: GraphSpec, kind: str) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of one graph, in order."""
    c = spec.config
    T = 1 if kind == "step" else SEQUENCE
    inputs = [_io("input_ids", onnx.TensorProto.INT64, [BATCH, T])]
    if kind == "prefill" and spec.attention_mask:
        inputs.append(_io("attention_mask", onnx.TensorProto.INT64, [BATCH, T]))
    outputs = [_io("logits", onnx.TensorProto.FLOAT, [BATCH, T, c.vocab_size])]
    for st in state_specs(spec):
        inputs.append(_io(st["input"], st["elem_type"], st["shape"]))
        outputs.append(_io(st["output"], st["elem_type"], st["output_shape"]))
    return {"inputs": inputs, "outputs": outputs}


def build_metadata(
    spec: GraphSpec,
    *,
    opset: int,
    ir_version: int,
    tokenizer: dict[str, Any],
    shape_hints: dict[str, Any],
    source: str | None,
    num_parameters: int,
) -> dict[str, Any]:
    c = spec.config
    if spec.form == "custom":
        op = {"form": "custom", "domain": CUSTOM_DOMAIN, "op_type": CUSTOM_OP, "version": CUSTOM_VERSION}
    elif spec.form == "onnx":
        op = {"form": "onnx", "domain": "", "op_type": ONNX_OP, "version": opset, "update_rule": "gated"}
    else:
        op = {"form": "decomposed", "domain": "", "op_type": None, "version": None}
    states = [
        {
            "layer": st["layer"],
            "kind": st["kind"],
            "input": st["input"],
            "output": st["output"],
            "shape": st["shape"],
            "dtype": ONNX_TYPE_NAMES[st["elem_type"]],
            "initial_value": 0,
            # hybrids: a full-attention KV cache grows along axis 2 (past_sequence -> present_sequence)
            # by bytes_per_token per row and token; every other state keeps its size
            "output_shape": st["output_shape"],
            "memory": st["memory"],
            "bytes_per_token": st["bytes_per_token"],
            **({"window_size": st["window_size"]} if st["kind"] in ("key", "value") else {}),
        }
        for st in state_specs(spec)
    ]
    config = c.to_dict()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": {"name": "gla-export", "version": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        "source": source,
        "files": {"prefill": PREFILL_FILE, "step": STEP_FILE, "weights": WEIGHTS_FILE},
        "opset": opset,
        "ir_version": ir_version,
        "gla_op": op,
        "dtype": dtype_name(spec.dtype),
        "state_dtype": dtype_name(spec.state_dtype),
        "logits_dtype": "float32",
        "model": {
            "architecture": "GLAForCausalLM",
            "config": config,
            "num_parameters": num_parameters,
            "vocab_size": c.vocab_size,
            "num_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_heads": c.num_heads,
            "num_kv_heads": c.kv_heads,
            "head_k_dim": c.head_k_dim,
            "head_v_dim": c.head_v_dim,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
        },
        "tokenizer": tokenizer,
        "graphs": {"prefill": graph_io(spec, "prefill"), "step": graph_io(spec, "step")},
        "states": states,
        "attention_layers": c.attention_layers,
        # how the attention layers are written: decomposed, onnx (Attention) or gqa (com.microsoft)
        "attention_op": spec.attention_op if c.attn is not None else None,
        # bytes one row's state grows by per token (0: constant-memory decoding)
        "state_bytes_per_token": sum(st["bytes_per_token"] for st in states),
        "padding": "left" if spec.attention_mask else None,
        # exports written before this field pad exactly only from zero states when the model has
        # short convolutions (the padding took slots of the convolution windows): runtimes read it
        "padding_with_past": True if spec.attention_mask else None,
        "shape_hints": shape_hints,
    }


def dumps(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2, sort_keys=False) + "\n"


# ---- reading: the typed view -----------------------------------------------------------------------
#
# Each dataclass below lists the JSON fields of one object of metadata.json by their JSON names.
# A new optional field is one line (a name, a type and a default): exports written before it
# open with the default, and fields this version does not know are kept in ``extra``.


def _build(cls, data: Any, where: str):
    """``cls`` from a JSON object: every field by its name (nested objects through the field's
    ``metadata["of"]``), the defaults for absent optional fields, ModelError for a missing
    required one or a value of the wrong kind."""
    from ..errors import ModelError

    if not isinstance(data, dict):
        raise ModelError(f"{where} must be a JSON object, got {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in ("extra", "export_dir", "raw"):
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ModelError(f"{where} has no field {f.name!r}")
            continue
        value, of = data[f.name], f.metadata.get("of")
        try:
            if of is not None and value is not None:
                value = of(value, f"{where}.{f.name}")
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise ModelError(f"{where}.{f.name} is malformed: {e}") from e
        kwargs[f.name] = value
    if any(f.name == "extra" for f in dataclasses.fields(cls)):
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ModelError(f"{where} is malformed: {e}") from e


def _list_of(cls):
    def build(items: Any, where: str) -> tuple:
        if not isinstance(items, list):
            raise TypeError(f"expected a list, got {type(items).__name__}")
        return tuple(_build(cls, x, f"{where}[{i}]") for i, x in enumerate(items))

    return build


def _one(cls):
    return lambda data, where: _build(cls, data, where)


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a graph; symbolic dimensions are strings (``batch``, ``sequence``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...] = field(metadata={"of": lambda v, w: tuple(v)})


@dataclass(frozen=True)
class GraphInfo:
    inputs: tuple[TensorInfo, ...] = field(metadata={"of": _list_of(TensorInfo)})
    outputs: tuple[TensorInfo, ...] = field(metadata={"of": _list_of(TensorInfo)})

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass(frozen=True)
class StateInfo:
    """One state of the graphs, with its batch dimension first: a GLA layer's recurrent or
    convolution state, an attention layer's KV cache (``key``/``value``), or a hybrid's shared
    ``position`` (``layer`` None)."""

    layer: int | None  # None: shared by the layers (a hybrid's position)
    kind: str  # recurrent_state | conv_state | key | value | position
    input: str  # past_key_values.{layer}.{kind}
    output: str  # present.{layer}.{kind}
    shape: tuple[int | str, ...] = field(metadata={"of": lambda v, w: tuple(v)})
    dtype: str
    initial_value: float = 0
    # the present output's shape; a full-attention KV cache's sequence axis grows
    # (past_sequence -> present_sequence). None when given (exports before hybrids): the input's shape.
    output_shape: tuple[int | str, ...] = field(default=None, metadata={"of": lambda v, w: tuple(v)})  # type: ignore[assignment]
    memory: str = "fixed"  # fixed | grows (by bytes_per_token per row and token)
    bytes_per_token: int = 0
    window_size: int | None = None  # key/value of an attention layer: its sliding window, None for full

    def __post_init__(self) -> None:
        # shapes as tuples however the fields were given; no output_shape: the input's
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "output_shape", tuple(self.shape if self.output_shape is None else self.output_shape))

    @property
    def grows(self) -> bool:
        """Whether this state grows with the context (a full-attention layer's KV cache)."""
        return self.memory != "fixed"

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one batch row (the batch dimension dropped); ModelError for a state that
        grows with the context, which has no fixed shape."""
        if self.grows:
            from ..errors import ModelError

            raise ModelError(f"state {self.input} grows with the context (shape {list(self.shape)}): it has no fixed "
                             "row shape")
        return tuple(int(d) for d in self.shape[1:])


@dataclass(frozen=True)
class OpInfo:
    form: str  # custom | onnx | decomposed
    domain: str | None = ""
    op_type: str | None = None
    version: int | None = None
    update_rule: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    num_layers: int
    architecture: str = "GLAForCausalLM"
    config: dict[str, Any] = field(default_factory=dict)
    num_parameters: int = 0
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_k_dim: int | None = None
    head_v_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


def _graphs(data: Any, where: str) -> dict[str, GraphInfo]:
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    return {name: _build(GraphInfo, g, f"{where}.{name}") for name, g in data.items()}


@dataclass(frozen=True)
class ExportMetadata:
    """metadata.json of an export, read and checked by :func:`open_export` (docs/export.md).

    ``export_dir`` is where it was read from; :meth:`path` gives a file of the export."""

    format: str
    format_version: int
    gla_op: OpInfo = field(metadata={"of": _one(OpInfo)})
    dtype: str
    model: ModelInfo = field(metadata={"of": _one(ModelInfo)})
    graphs: dict[str, GraphInfo] = field(metadata={"of": _graphs})
    states: tuple[StateInfo, ...] = field(metadata={"of": _list_of(StateInfo)})
    files: dict[str, str] = field(
        default_factory=lambda: {"prefill": PREFILL_FILE, "step": STEP_FILE, "weights": WEIGHTS_FILE})
    state_dtype: str = "float32"
    logits_dtype: str = "float32"
    producer: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    opset: int | None = None
    ir_version: int | None = None
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    padding: str | None = None
    padding_with_past: bool | None = None
    attention_layers: Any = None  # hybrids: the config's attention-layer spec (None: pure GLA)
    attention_op: str | None = None  # hybrids: decomposed, onnx or gqa (None: pure GLA, or written before the field)
    state_bytes_per_token: int = 0  # what one row's state grows by per token (0: constant memory)
    shape_hints: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # fields this version does not know, kept
    export_dir: Path | None = field(default=None, compare=False)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the JSON as read

    @property
    def form(self) -> str:
        """How the GLA op is written: ``custom``, ``onnx`` or ``decomposed``."""
        return self.gla_op.form

    @property
    def has_attention_mask(self) -> bool:
        return "attention_mask" in self.graphs["prefill"].input_names

    def path(self, graph: str) -> Path:
        """The file of ``graph`` (``prefill``, ``step``, ``weights``) in the export directory."""
        assert self.export_dir is not None, "metadata not read from a directory"
        return self.export_dir / self.files.get(graph, f"{graph}.onnx")

    @classmethod
    def from_dict(cls, data: dict[str, Any], export_dir: str | Path | None = None) -> ExportMetadata:
        """The typed view of a metadata JSON object, checked (:meth:`check`): ModelError (exit 3)
        in one line when a field is missing or malformed."""
        meta = _build(cls, data, METADATA_FILE)
        object.__setattr__(meta, "raw", data)
        if export_dir is not None:
            object.__setattr__(meta, "export_dir", Path(export_dir))
        meta.check()
        return meta

    def check(self) -> None:
        """What a runtime relies on: both graphs listed with their inputs and outputs, and one
        state per past-state input of the step graph, every layer's recurrent state (an attention
        layer's key and value) among them."""
        from ..errors import ModelError

        where = METADATA_FILE
        missing = [g for g in ("prefill", "step") if g not in self.graphs]
        if missing:
            raise ModelError(f"{where} lists no {' or '.join(missing)} graph: the export is incomplete or damaged "
                             "(export it again)")
        for dtype in (self.dtype, self.state_dtype):
            if dtype not in FLOAT_NAMES:
                raise ModelError(f"{where}: dtype {dtype!r} is not one of {', '.join(FLOAT_NAMES)}")
        for s in self.states:
            if s.dtype not in DTYPES:
                raise ModelError(f"{where}: state {s.input} has dtype {s.dtype!r}, which gla-export does not know")
            if s.memory not in ("fixed", "grows"):
                raise ModelError(f"{where}: state {s.input} has memory {s.memory!r}, which is neither fixed nor grows")
        step = self.graphs["step"]
        if "input_ids" not in step.input_names or "logits" not in step.output_names:
            raise ModelError(f"{where}: the step graph lists no input_ids input or logits output")
        listed = {s.input for s in self.states}
        past = [n for n in step.input_names if n != "input_ids"]
        unlisted = [n for n in past if n not in listed]
        kinds: dict[int | None, set[str]] = {}
        for s in self.states:
            kinds.setdefault(s.layer, set()).add(s.kind)
        # a GLA layer has a recurrent state; a hybrid's attention layer a KV cache instead
        no_state = [i for i in range(self.model.num_layers)
                    if "recurrent_state" not in kinds.get(i, ()) and not {"key", "value"} <= kinds.get(i, set())]
        if unlisted or no_state or not self.states:
            what = (f"no entry for the step graph's inputs {unlisted[:3]}" if unlisted
                    else f"no recurrent state or KV cache for layers {no_state[:5]}")
            raise ModelError(f"{where}: the state list is truncated ({len(self.states)} states; {what}): "
                             "the export is damaged (export it again)")
        extra = sorted(listed - set(past))
        if extra:
            raise ModelError(f"{where}: states {extra[:3]} are not inputs of the step graph")

    def __getitem__(self, key: str) -> Any:
        """``meta["model"]`` as from the JSON dict that open_export returned before this class (for
        code written against it; new code reads the attributes)."""
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as read (the fields this version does not know included)."""
        return json.loads(json.dumps(self.raw))


def as_metadata(metadata: ExportMetadata | dict[str, Any]) -> ExportMetadata:
    """The typed view of ``metadata`` (for functions that also take the JSON dict)."""
    return metadata if isinstance(metadata, ExportMetadata) else ExportMetadata.from_dict(metadata)


def open_export(export_dir: str | Path) -> ExportMetadata:
    """The checked metadata of an export directory for the commands that read one (generate,
    verify, bench, build): UsageError (exit 2) when the directory is not an export, ModelError
    (exit 3) when its metadata is unreadable, of another format or a newer version, incomplete
    (no graphs listed, a truncated state list), or a graph file is missing."""
    from ..errors import ModelError, UsageError

    export_dir = Path(export_dir)
    if not (export_dir / METADATA_FILE).is_file():
        raise UsageError(f"{export_dir} is not an export directory (no {METADATA_FILE}): "
                         f"run `gla-export export -o {export_dir}` first")
    try:
        raw = read_metadata(export_dir)
    except (OSError, ValueError) as e:  # json's errors are ValueErrors
        raise ModelError(f"cannot read {export_dir / METADATA_FILE}: {e}") from e
    meta = ExportMetadata.from_dict(raw, export_dir)
    for graph in ("prefill", "step"):
        path = meta.path(graph)
        if not path.is_file():
            raise ModelError(f"{path} is missing: the export in {export_dir} is incomplete")
    return meta


def read_metadata(export_dir: str | Path) -> dict[str, Any]:
    """The metadata JSON of an export directory as a dict (checks the format name and version;
    :func:`open_export` gives the typed, fully checked view)."""
    path = Path(export_dir) / METADATA_FILE
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gla-export metadata file")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than this gla-export reads ({FORMAT_VERSION})")
    return meta
