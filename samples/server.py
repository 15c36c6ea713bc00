#!/usr/bin/env python3
"""The OpenAI-compatible server of ``gla-export serve``, started from the library API.

    python samples/server.py EXPORT_DIR --port 8000 [--cache-dir DIR]
    curl localhost:8000/v1/completions -d '{"prompt": "In the beginning", "max_tokens": 40}'

``gla-export serve`` does the same with every option (docs/serving.md); this page shows the
pieces an application embedding the server uses: a :class:`ServeConfig`, a :class:`Server`
(the model, the pool of state slots sized from the memory limit, the prefix state cache and
the continuous-batching scheduler), and :func:`serve`, which runs it under uvicorn until
SIGINT/SIGTERM, then finishes the requests in flight and persists the cache.
"""

from __future__ import annotations

import argparse
import sys

from gla_export.errors import GlaExportError
from gla_export.serve import ServeConfig, Server, serve


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve an export over an OpenAI-compatible HTTP API.")
    ap.add_argument("export_dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    ap.add_argument("--backend", default="ort-cpu", choices=["ort-cpu", "ort-cuda"])
    ap.add_argument("--memory-limit-mib", type=int, default=None, help="the pool is sized from it")
    ap.add_argument("--cache-dir", default=None, help="persist the prefix state cache here")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = ap.parse_args()

    config = ServeConfig(backend=args.backend, threads=args.threads, cache_dir=args.cache_dir,
                         memory_limit=args.memory_limit_mib * 2**20 if args.memory_limit_mib else None)
    try:
        server = Server(args.export_dir, config)
    except GlaExportError as e:
        sys.exit(f"server: {e}")
    print(f"{server.plan.slots} state slots, prefix cache {server.plan.cache / 2**20:.0f} MiB", file=sys.stderr)
    serve(server, args.host, args.port, on_listening=lambda url: print(f"listening on {url}", flush=True))


if __name__ == "__main__":
    main()
