"""``gla-export serve EXPORT_DIR``: an OpenAI-compatible HTTP server (docs/serving.md)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ..serve.config import MiB
from ..serve.config import ServeConfig as _DEFAULT  # the option defaults (no FastAPI import)
from . import RUNTIMES

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


class Size(click.ParamType):
    """Bytes, with an optional unit: 512MiB, 2GiB, 1.5G, 1000000."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            self.fail(f"{value!r} is not a size (examples: 512MiB, 2GiB, 1000000)", param, ctx)
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if n <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return n


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-b", "--backend", type=click.Choice(RUNTIMES), default=_DEFAULT.backend, show_default=True,
              help="ort-cpu / ort-cuda: ONNX Runtime; trt: the engines of `gla-export build` (not yet run on a GPU).")
@click.option("--cuda-graph", is_flag=True,
              help="ort-cuda: run the decode step as captured CUDA graphs (opt-in until proven on a GPU).")
@click.option("--sample-on-device", is_flag=True,
              help="ort-cuda/trt: pick tokens on the GPU, only the ids come to the host (opt-in until proven on a GPU).")
@click.option("--engines-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="trt: where `gla-export build` put the engines (default EXPORT_DIR/tensorrt).")
@click.option("--plugin", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="trt: the gla TensorRT plugin library (default: the one built with gla-export).")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help="Hybrids with full-attention layers: tokens of KV cache each slot holds (prompt and answer); "
                   "the pool is sized from the bytes at that context.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="0 picks a free port (the URL is printed on stdout).")
@click.option("--model-name", default=None, help="The model id clients name (default: the export directory's name).")
@click.option("--memory-limit", type=Size(), default=None,
              help="Memory the server may use in all (model, slots, prefill, cache); the slot pool is sized from "
                   "it. Default: what the model takes plus 80%% of the memory available.")
@click.option("--cache-memory", type=Size(), default=None,
              help="Prefix state cache in memory (default: a quarter of what the limit leaves after the model).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Persist the prefix cache here (state files); it is read back after a restart.")
@click.option("--cache-dir-size", type=Size(), default=None, help="Bound of --cache-dir (oldest files go first).")
@click.option("--max-slots", type=click.IntRange(min=1), default=_DEFAULT.max_slots, show_default=True,
              help="Upper bound on the pool (the widest decode step worth running); memory decides below it.")
@click.option("--max-queue", type=click.IntRange(min=0), default=_DEFAULT.max_queue, show_default=True,
              help="Requests waiting for a slot before new ones get 429.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=_DEFAULT.prefill_chunk, show_default=True,
              help="Tokens of one prompt read per scheduler iteration at most.")
@click.option("--token-budget", type=click.IntRange(min=16), default=_DEFAULT.token_budget, show_default=True,
              help="Tokens (prefill chunks, padded, plus decode rows) per iteration at most; bounds prefill memory.")
@click.option("--prefill-share", type=click.FloatRange(min=0.01, max=10), default=_DEFAULT.prefill_share, show_default=True,
              help="While streams decode, prefill time per iteration as a fraction of a step's.")
@click.option("--snapshot-interval", type=click.IntRange(min=0), default=_DEFAULT.snapshot_interval, show_default=True,
              help="Cache the state every this many tokens of a long prompt (0: only at request ends).")
@click.option("--max-body-bytes", type=Size(), default=f"{_DEFAULT.max_body_bytes // MiB}MiB",
              show_default=True, help="Larger bodies get 413.")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=_DEFAULT.max_prompt_tokens, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=_DEFAULT.max_tokens, show_default=True,
              help="Upper bound of a request's max_tokens.")
@click.option("--request-timeout", type=click.FloatRange(min=0), default=_DEFAULT.request_timeout, show_default=True,
              help="Seconds a request may take from arrival to its last token (0: none).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=_DEFAULT.drain_timeout, show_default=True,
              help="At SIGTERM/SIGINT: seconds requests in flight get to finish before they are cancelled.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--device-id", type=click.IntRange(min=0), default=_DEFAULT.device_id, show_default=True, help="GPU for ort-cuda.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="warning",
              show_default=True, help="uvicorn's log level.")
def serve(export_dir: Path, backend: str, cuda_graph: bool, sample_on_device: bool, engines_dir: Path | None,
          plugin: Path | None, max_context: int | None, host: str, port: int, model_name: str | None, memory_limit: int | None,
          cache_memory: int | None, cache_dir: Path | None, cache_dir_size: int | None, max_slots: int, max_queue: int,
          prefill_chunk: int, token_budget: int, prefill_share: float, snapshot_interval: int, max_body_bytes: int,
          max_prompt_tokens: int, max_tokens: int, request_timeout: float, drain_timeout: float, threads: int | None,
          device_id: int, log_level: str) -> None:
    """Serve the export in EXPORT_DIR over an OpenAI-compatible HTTP API.

    POST /v1/completions and /v1/chat/completions (streaming with "stream": true), GET /v1/models,
    /health, /ready, /metrics (Prometheus) and /stats. Requests are batched continuously over a
    pool of state slots sized from --memory-limit; prompts are read in chunks between decode
    steps; states are cached by token prefix, so a follow-up turn reads only its new tokens.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        from ..errors import MissingRuntimeError

        raise MissingRuntimeError(f"gla-export serve needs the serve extra: pip install 'gla-export[serve]' ({e})") from e
    from ..serve.app import ServeConfig, Server
    from ..serve.app import serve as run

    cfg = ServeConfig(backend=backend, threads=threads, device_id=device_id, cuda_graph=cuda_graph,
                      sample_on_device=sample_on_device, engines_dir=str(engines_dir) if engines_dir else None,
                      plugin=str(plugin) if plugin else None, max_context=max_context, model_name=model_name,
                      memory_limit=memory_limit, cache_bytes=cache_memory,
                      cache_dir=str(cache_dir) if cache_dir else None, cache_dir_bytes=cache_dir_size,
                      max_slots=max_slots, max_queue=max_queue, prefill_chunk=prefill_chunk, token_budget=token_budget,
                      prefill_share=prefill_share, snapshot_interval=snapshot_interval, max_body_bytes=max_body_bytes,
                      max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                      request_timeout=request_timeout or None, drain_timeout=drain_timeout)
    server = Server(export_dir, cfg)
    plan = server.plan

    def listening(url: str) -> None:
        click.echo(f"listening on {url} ({server.graphs.runtime_name}, model {server.model_name!r}, {plan.slots} slots "
                   f"of {plan.slot} bytes, cache {plan.cache / 2**20:.0f} MiB, memory limit "
                   f"{plan.limit / 2**20:.0f} MiB)")
        import sys

        sys.stdout.flush()

    run(server, host, port, on_listening=listening, log_level=log_level)
