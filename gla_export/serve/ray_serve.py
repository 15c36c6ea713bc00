"""Scale-out on Ray Serve: the same server (``Server`` + the FastAPI app) as a Ray Serve
deployment, one server per replica, behind Ray Serve's HTTP proxy.

Routing: :class:`ConversationAffinityRouter`, a Ray Serve request router, sends every request
that carries an ``X-Conversation-Id`` (or ``X-Session-Id``) header to the same replica, chosen by
rendezvous hashing over the live replicas: a conversation's follow-ups land where its state is
cached, and when a replica goes away only its own conversations move. A request without the
header goes to the least loaded of two random replicas (the body, where the prompt is, is not
read by the proxy before routing, so prefix affinity needs the header: clients put their
conversation or system-prompt id in it).

Failover: every replica writes its prefix cache through to one ``cache_dir`` that all replicas
share (a directory on a shared filesystem across hosts). A conversation whose replica died goes
to another replica, which finds the conversation's last state there and prefills only what is
new; what the dead replica was generating at that moment is lost with it (its client sees the
stream break and retries the turn).

    from gla_export.serve.ray_serve import deployment
    serve.run(deployment("EXPORT_DIR", cache_dir="/shared/gla-cache", num_replicas=2), route_prefix="/")
"""

from __future__ import annotations

import hashlib
import pickle
import random
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from .app import ServeConfig

AFFINITY_HEADERS = (b"x-conversation-id", b"x-session-id")


def conversation_key(pending: PendingRequest | None) -> str | None:
    """The affinity header of an HTTP request routed by Ray Serve's proxy, if any."""
    if pending is None:
        return None
    for arg in pending.args:
        if isinstance(arg, bytes):  # the proxy sends its StreamingHTTPRequest pickled
            try:
                arg = pickle.loads(arg)
            except Exception:  # noqa: BLE001 - not a request of the proxy: no affinity
                continue
        scope = getattr(arg, "asgi_scope", None)
        if isinstance(scope, dict):
            for k, v in scope.get("headers", ()):
                if k.lower() in AFFINITY_HEADERS and v:
                    return v.decode("latin-1")
    return None


def rendezvous(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids by decreasing hash weight for ``key`` (highest random weight hashing)."""
    def weight(rid: str) -> bytes:
        return hashlib.sha256(f"{key}\0{rid}".encode()).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class ConversationAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = conversation_key(pending_request)
        if key is not None:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            return [[by_id[rid]] for rid in rendezvous(key, list(by_id))]
        pair = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        available = self.select_available_replicas(pair) or pair
        return [available]


@serve.ingress()
class GlaServeReplica:
    """One ``gla-export serve`` server in a Ray Serve replica."""

    def __init__(self, export_dir: str, config: dict[str, Any]):
        import ray

        from .app import Server

        self.server = Server(export_dir, ServeConfig(**config))
        self.server.start()
        self.name = ray.get_runtime_context().get_actor_name() or "replica"

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.server, served_by=self.name)

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def deployment(export_dir: str, *, num_replicas: int = 2, cache_dir: str | None = None,
               ray_actor_options: dict[str, Any] | None = None, max_replicas_per_node: int | None = None,
               max_ongoing_requests: int = 256, **config: Any):
    """A bound Ray Serve application: ``num_replicas`` servers of ``export_dir`` sharing
    ``cache_dir``, routed by :class:`ConversationAffinityRouter`. ``config``: fields of
    :class:`~gla_export.serve.app.ServeConfig` (give ``memory_limit``: replicas share a host's memory)."""
    from ray.serve.config import RequestRouterConfig

    cfg = asdict(ServeConfig(cache_dir=cache_dir, **config))
    dep = serve.deployment(
        GlaServeReplica,
        name="gla-serve",
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
        max_replicas_per_node=max_replicas_per_node,
        request_router_config=RequestRouterConfig(request_router_class=ConversationAffinityRouter),
        graceful_shutdown_timeout_s=cfg["drain_timeout"] + 5,
    )
    return dep.bind(str(export_dir), cfg)
