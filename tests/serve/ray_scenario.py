#!/usr/bin/env python3
"""The Ray Serve scenario of test_ray_serve.py, run by that test in a private network namespace
(``unshare -n``) whose only interface is loopback, so that the kernel itself keeps every
connection of the cluster on 127.0.0.1 (outside such a namespace Ray binds its agents to the
host's interface address and probes cloud metadata addresses).

    unshare -n python tests/serve/ray_scenario.py --loopback-up EXPORT_DIR WORK_DIR
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import ray

ROOT = Path(__file__).resolve().parents[2]


def loopback_up() -> None:
    """A new network namespace has its loopback interface down: bring it up (SIOCSIFFLAGS)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ifr = struct.pack("16sH14s", b"lo", 0, b"")
    flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, ifr))[1]  # SIOCGIFFLAGS
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 0x1, b""))  # SIOCSIFFLAGS, IFF_UP
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(tmp: Path) -> tuple[str, dict]:
    """``ray start`` a head and a worker node on 127.0.0.1, one CPU and 2 GiB each."""
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--memory", str(2 << 30),
              "--object-store-memory", str(80 << 20), "--disable-usage-stats"]
    head = subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--temp-dir", str(tmp),
                           "--include-dashboard", "false", *common], env=env, capture_output=True, text=True,
                          timeout=120)
    if head.returncode != 0:
        sys.exit(f"ray start --head failed: {head.stdout[-2000:]} {head.stderr[-2000:]}")
    address = f"127.0.0.1:{port}"
    worker = subprocess.run([ray_bin, "start", "--address", address, *common], env=env, capture_output=True,
                            text=True, timeout=120)
    if worker.returncode != 0:
        sys.exit(f"ray start (worker) failed: {worker.stdout[-2000:]} {worker.stderr[-2000:]}")
    return address, env


def stop_cluster(env: dict) -> None:
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def scenario(address: str, env: dict, export_dir: str, work: Path) -> None:
    from ray import serve

    from gla_export.serve.ray_serve import deployment

    cache_dir = work / "cache"
    t0 = time.monotonic()
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": env["PYTHONPATH"]}}, log_to_driver=False)
    try:
        http_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        app = deployment(export_dir, num_replicas=2, cache_dir=str(cache_dir), max_replicas_per_node=1,
                         ray_actor_options={"num_cpus": 1}, threads=1, memory_limit=1 << 30, model_name="tiny",
                         drain_timeout=2)
        serve.run(app, name="gla", route_prefix="/")
        url = f"http://127.0.0.1:{http_port}"
        assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
        print(f"deployed in {time.monotonic() - t0:.1f} s", flush=True)

        def ask(conversation: str, prompt, n: int, **kw):
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120,
                              default_headers={"X-Conversation-Id": conversation})
            return c.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                          **kw)

        # affinity: each conversation's turns land on one replica; different conversations spread (rendezvous
        # hashing over random replica ids: with 4 conversations all landed on one replica in 1 run of 8)
        homes = {}
        for cid in (f"conversation-{i}" for i in range(12)):
            served = {ask(cid, [256, 65], 1).headers["x-served-by"] for _ in range(3)}
            assert len(served) == 1, served
            homes[cid] = served.pop()
        assert len(set(homes.values())) == 2, homes

        # turn one of a conversation: its state is cached (and written through to the shared directory)
        prompt = [256, *b"A conversation that must survive its replica"]
        ask("conversation-0", prompt, 1)
        victim = homes["conversation-0"]
        deadline = time.monotonic() + 30
        while not any(cache_dir.glob(f"{len(prompt):09d}-*")):
            assert time.monotonic() < deadline, "the first turn's state never reached the shared cache"
            time.sleep(0.1)

        # a stream of that conversation, and its replica killed in the middle of it
        events, broke = [], threading.Event()

        def stream():
            try:
                c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60,
                                  default_headers={"X-Conversation-Id": "conversation-0"})
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
                r = ask("conversation-0", prompt + list(b" again"), 2)
                break
            except (openai.APIError, httpx.HTTPError):
                assert time.monotonic() < deadline
                time.sleep(0.5)
        body = r.parse()
        assert r.headers["x-served-by"] != victim
        assert body.usage.prompt_tokens_details.cached_tokens == len(prompt)
        print(f"scenario {time.monotonic() - t0:.1f} s", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loopback-up", action="store_true", help="bring lo up first (in a new network namespace)")
    ap.add_argument("export_dir")
    ap.add_argument("work_dir", type=Path)
    args = ap.parse_args()
    if args.loopback_up:
        loopback_up()
    tmp = Path("/tmp") / f"rs{os.getpid()}"  # Ray's socket paths must stay short
    t0 = time.monotonic()
    address, env = start_cluster(tmp)
    print(f"two-node Ray cluster up in {time.monotonic() - t0:.1f} s", flush=True)
    try:
        scenario(address, env, args.export_dir, args.work_dir)
    finally:
        stop_cluster(env)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"done in {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
