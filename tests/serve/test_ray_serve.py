"""Scale-out on Ray Serve: a local two-node Ray cluster on loopback (a head and a worker node,
one CPU each), two replicas of the server sharing a cache directory, conversation-affinity
routing, and a replica killed in the middle of a stream: the conversation goes on on the other
replica from the persisted state."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``ray start`` a head and a worker node on 127.0.0.1; yields the GCS address."""
    ray_bin = shutil.which("ray") or str(Path(os.sys.executable).parent / "ray")
    tmp = Path("/tmp") / f"rs{os.getpid()}"  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--memory", str(2 << 30),
              "--object-store-memory", str(80 << 20), "--disable-usage-stats"]
    started = time.monotonic()
    head = subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--temp-dir", str(tmp),
                           "--include-dashboard", "false", "--dashboard-agent-listen-port", str(free_port()), *common],
                          env=env, capture_output=True, text=True, timeout=120)
    if head.returncode != 0:
        pytest.fail(f"ray start --head failed: {head.stdout[-2000:]} {head.stderr[-2000:]}")
    # Ray rewrites a bootstrap address of 127.0.0.1 to the host's own interface address; 127.0.0.2
    # is loopback too and left alone, so that every connection stays on the loopback interface
    address = f"127.0.0.2:{port}"
    try:
        worker = subprocess.run([ray_bin, "start", "--address", address,
                                 "--dashboard-agent-listen-port", str(free_port()), *common],
                                env=env, capture_output=True, text=True, timeout=120)
        if worker.returncode != 0:
            pytest.fail(f"ray start (worker) failed: {worker.stdout[-2000:]} {worker.stderr[-2000:]}")
        print(f"two-node Ray cluster up in {time.monotonic() - started:.1f} s")
        yield address, env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def test_replica_killed_mid_stream_conversation_continues_elsewhere(cluster, tiny_export, tmp_path):
    from ray import serve

    from gla_export.serve.ray_serve import deployment

    address, env = cluster
    t0 = time.monotonic()
    ray.init(address=address, _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": env["PYTHONPATH"]}}, log_to_driver=False)
    try:
        http_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        app = deployment(str(tiny_export), num_replicas=2, cache_dir=str(tmp_path / "cache"), max_replicas_per_node=1,
                         ray_actor_options={"num_cpus": 1}, threads=1, memory_limit=1 << 30, model_name="tiny",
                         drain_timeout=2)
        serve.run(app, name="gla", route_prefix="/")
        url = f"http://127.0.0.1:{http_port}"
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        print(f"deployed in {time.monotonic() - t0:.1f} s")

        def ask(conversation: str, prompt, n: int, **kw):
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120,
                              default_headers={"X-Conversation-Id": conversation})
            return c.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                          **kw)

        # affinity: each conversation's turns land on one replica; different conversations spread
        homes = {}
        for cid in ("alice", "bob", "carol", "dave"):
            served = {ask(cid, [256, 65], 1).headers["x-served-by"] for _ in range(3)}
            assert len(served) == 1, served
            homes[cid] = served.pop()
        assert len(set(homes.values())) == 2, homes

        # turn one of a conversation: its state is cached (and written through to the shared directory)
        prompt = [256, *b"A conversation that must survive its replica"]
        ask("alice", prompt, 1)
        victim = homes["alice"]
        deadline = time.monotonic() + 30
        while not any((tmp_path / "cache").glob(f"{len(prompt):09d}-*")):
            assert time.monotonic() < deadline, "the first turn's state never reached the shared cache"
            time.sleep(0.1)

        # a stream of that conversation, and its replica killed in the middle of it
        events, broke = [], threading.Event()

        def stream():
            try:
                c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60,
                                  default_headers={"X-Conversation-Id": "alice"})
                for chunk in c.completions.create(model="tiny", prompt=prompt + list(b" go on"), max_tokens=4000,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    events.append(chunk)
            except Exception as e:  # noqa: BLE001 - the expected end of this stream
                events.append(e)
            broke.set()

        threading.Thread(target=stream, daemon=True).start()
        while len(events) < 5:
            assert not broke.is_set(), events[-1:]
            time.sleep(0.02)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        assert broke.wait(60)
        assert isinstance(events[-1], Exception) or events[-1].choices[0].finish_reason is None

        # the next turn goes to the surviving replica, which reads the state from the shared directory
        deadline = time.monotonic() + 60
        while True:
            try:
                r = ask("alice", prompt + list(b" again"), 2)
                break
            except (openai.APIError, httpx.HTTPError):
                assert time.monotonic() < deadline
                time.sleep(0.5)
        body = r.parse()
        assert r.headers["x-served-by"] != victim
        assert body.usage.prompt_tokens_details.cached_tokens == len(prompt)
        print(f"whole scenario {time.monotonic() - t0:.1f} s")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
