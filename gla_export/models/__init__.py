"""GLA language models: fla-compatible architecture, safetensors loading, builders."""

from .builder import (
    RECOMMENDED,
    attention_spec,
    build_model,
    count_parameters,
    make_config,
    output_size,
    recommended_config,
    state_shapes,
)
from .config import ConfigError, GLAConfig
from .loader import CheckpointError, load_config, load_model, load_state_dict, sample_model_path, save_model
from .modeling import Attention, CausalLMOutput, GatedLinearAttention, GLABlock, GLAForCausalLM, GLAModel, LayerState
from .tokenizer import ByteTokenizer

__all__ = [
    "RECOMMENDED",
    "Attention",
    "ByteTokenizer",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "GLABlock",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "GatedLinearAttention",
    "LayerState",
    "attention_spec",
    "build_model",
    "count_parameters",
    "load_config",
    "load_model",
    "load_state_dict",
    "make_config",
    "output_size",
    "recommended_config",
    "sample_model_path",
    "save_model",
    "state_shapes",
]
