"""Load and save checkpoint directories: ``config.json`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). Weights are only ever read with safetensors, never unpickled.

The same directory layout as flash-linear-attention / Hugging Face, so an fla ``GLAForCausalLM``
checkpoint loads unchanged. The output-norm weight may be named ``g_norm_swish_gate`` or
``g_norm`` whatever the ``fuse_norm`` flag says: both load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, GLAConfig
from .modeling import GatedLinearAttention, GLAForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLED = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file or the weight."""


def sample_model_path() -> Path:
    """The small GLA model bundled with the package: the default of every command that takes a model."""
    return Path(__file__).resolve().parent.parent / "assets" / "sample-model"


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a valid safetensors index ({e})") from e
        return [path / n for n in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if len(others) == 1:
        return [path / others[0]]
    pickled = [n for n in _PICKLED if (path / n).exists()]
    if pickled:
        raise CheckpointError(
            f"{path} holds {pickled[0]}, a pickled checkpoint; only safetensors files are read "
            "(convert it with safetensors.torch.save_file on a machine you trust)"
        )
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (or of one ``.safetensors`` file)."""
    path = Path(path)
    files = [path] if path.is_file() else _weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: weight file named by the index is missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    tensors[key] = sf.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    return tensors


def load_config(path: str | os.PathLike) -> GLAConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json")
    return GLAConfig.from_json(path / "config.json")


def _rename_norms(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Accept ``g_norm`` for ``g_norm_swish_gate`` and the other way round."""
    out = {}
    for key, t in sd.items():
        if key not in expected:
            alt = re.sub(r"\.g_norm_swish_gate\.", ".g_norm.", key)
            if alt == key:
                alt = re.sub(r"\.g_norm\.", ".g_norm_swish_gate.", key)
            if alt in expected:
                key = alt
        out[key] = t
    return out


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> GLAForCausalLM:
    """Load a GLA causal LM from a checkpoint directory (default: the bundled sample model).

    Raises :class:`CheckpointError` for a missing, unknown or misshapen weight or a file that is
    not safetensors, and :class:`~gla_export.models.config.ConfigError` for a config field value
    that cannot be run. ``dtype=None`` keeps the checkpoint's dtype.
    """
    path = Path(path) if path is not None else sample_model_path()
    config = load_config(path)
    sd = load_state_dict(path)
    with torch.device("meta"):
        model = GLAForCausalLM(config)
    expected = {k: v for k, v in model.state_dict().items()}
    sd = _rename_norms(sd, set(expected))

    unknown = sorted(set(sd) - set(expected))
    if unknown:
        raise CheckpointError(f"{path}: unknown weight '{unknown[0]}'" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = sorted(set(expected) - set(sd))
    if config.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing:
        raise CheckpointError(f"{path}: missing weight '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for key, t in sd.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: weight '{key}' has shape {list(t.shape)}, the config implies {list(expected[key].shape)}"
            )

    model = model.to_empty(device=device)
    if dtype is not None:
        model = cast_model(model, dtype)
    # copy_ casts each tensor to its parameter's dtype; with dtype=None the checkpoint's are kept
    model.load_state_dict(sd, strict=False, assign=dtype is None)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    return model.eval()


def cast_model(model: GLAForCausalLM, dtype: torch.dtype) -> GLAForCausalLM:
    """Convert in place to ``dtype``, except the unfused output norm, which keeps float32 weights
    as fla's does (the loader and the exporter both convert through here)."""
    if any(p.dtype != dtype for n, p in model.named_parameters() if ".g_norm." not in n):
        model.to(dtype)
    for m in model.modules():
        if isinstance(m, GatedLinearAttention) and hasattr(m, "g_norm"):
            m.g_norm.float()
    return model


def save_model(model: GLAForCausalLM, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (a tied ``lm_head`` is stored once)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    tmp = path / (SINGLE_FILE + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path / SINGLE_FILE)
    model.config.to_json(path / "config.json")
    return path


__all__ = ["CheckpointError", "ConfigError", "load_config", "load_model", "load_state_dict", "sample_model_path", "save_model"]
