"""The metadata of an export: ``metadata.json`` beside the graphs, and the same JSON in each
graph's ``metadata_props`` (key :data:`METADATA_KEY`). docs/export.md is its specification; bump
:data:`FORMAT_VERSION` on any change a runtime could notice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
import torch

from .. import __version__
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
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
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
        "dtype": DTYPE_NAMES[spec.dtype],
        "state_dtype": DTYPE_NAMES[spec.state_dtype],
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


def open_export(export_dir: str | Path) -> dict[str, Any]:
    """The metadata of an export directory for the commands that read one (generate, verify,
    bench, build): UsageError (exit 2) when the directory is not an export, ModelError (exit 3)
    when its metadata is unreadable, of another format or a newer version, or a graph is missing."""
    from ..errors import ModelError, UsageError

    export_dir = Path(export_dir)
    if not (export_dir / METADATA_FILE).is_file():
        raise UsageError(f"{export_dir} is not an export directory (no {METADATA_FILE}): "
                         f"run `gla-export export -o {export_dir}` first")
    try:
        meta = read_metadata(export_dir)
    except (OSError, ValueError) as e:  # json's errors are ValueErrors
        raise ModelError(f"cannot read {export_dir / METADATA_FILE}: {e}") from e
    for graph in ("prefill", "step"):
        path = export_dir / meta.get("files", {}).get(graph, f"{graph}.onnx")
        if not path.is_file():
            raise ModelError(f"{path} is missing: the export in {export_dir} is incomplete")
    return meta


def read_metadata(export_dir: str | Path) -> dict[str, Any]:
    """The metadata of an export directory (checks the format name and version)."""
    path = Path(export_dir) / METADATA_FILE
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gla-export metadata file")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than this gla-export reads ({FORMAT_VERSION})")
    return meta
