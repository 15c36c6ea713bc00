"""``gla-export serve``: an OpenAI-compatible HTTP server over an export, with continuous
batching over a pool of state slots and a token-level prefix state cache (docs/serving.md).

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client). Modules:
``backend`` (the one door into gla_export.runtime/export), ``cache`` (the prefix cache),
``scheduler`` (continuous batching), ``protocol`` (OpenAI bodies), ``chat`` (templates),
``app`` (the FastAPI app and the process), ``ray_serve`` (scale-out on Ray Serve).
"""

from __future__ import annotations

__all__ = ["ServeConfig", "Server", "create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
