"""The server's settings (:class:`ServeConfig`): a module of its own, without FastAPI, so that
``gla-export serve`` takes its option defaults from here without importing the serve extra."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20


@dataclass
class ServeConfig:
    backend: str = "ort-cpu"
    threads: int | None = None
    device_id: int = 0
    cuda_graph: bool = False  # ort-cuda: the step as captured CUDA graphs (opt-in until proven on a GPU)
    sample_on_device: bool = False  # ort-cuda/trt: pick tokens on the GPU (opt-in until proven on a GPU)
    engines_dir: str | None = None  # trt: where `gla-export build` put the engines
    plugin: str | None = None  # trt: the plugin library
    max_context: int | None = None  # hybrids with full-attention layers: tokens of KV cache per slot
    model_name: str | None = None
    memory_limit: int | None = None  # bytes the server may use in all; default: 80% of what is available
    cache_bytes: int | None = None  # prefix cache in memory; default: a quarter of what the pool may use
    cache_dir: str | None = None
    cache_dir_bytes: int | None = None
    max_slots: int = 256
    max_queue: int = 256
    prefill_chunk: int = 256
    token_budget: int = 1024
    prefill_share: float = 0.5
    snapshot_interval: int = 4096
    max_body_bytes: int = 8 * MiB
    max_prompt_tokens: int = 2_000_000
    max_tokens: int = 4096
    request_timeout: float | None = 600.0
    drain_timeout: float = 30.0
