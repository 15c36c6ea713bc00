"""Scale-out on Ray Serve: a local two-node Ray cluster (a head and a worker node started with
``ray start --node-ip-address 127.0.0.1``, one CPU and 2 GiB each), two replicas of the server
sharing a cache directory, conversation-affinity routing, and a replica killed in the middle of
a stream: the conversation goes on on the other replica from the persisted state.

The scenario (tests/serve/ray_scenario.py) runs in a private network namespace whose only
interface is loopback (``unshare -n``, root), so that every connection stays on 127.0.0.1: in
the host's namespace Ray binds its dashboard and runtime-env agents to the host's interface
address whatever --node-ip-address says, and rewrites a bootstrap address of 127.0.0.1 to it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("openai")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_replica_killed_mid_stream_conversation_continues_elsewhere(tiny_export, tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs `unshare -n` (root) for a loopback-only network namespace")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.monotonic()
    r = subprocess.run([unshare, "-n", sys.executable, str(ROOT / "tests/serve/ray_scenario.py"), "--loopback-up",
                        str(tiny_export), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400)
    print(r.stdout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    assert "scenario" in r.stdout
    print(f"the Ray test took {time.monotonic() - t0:.1f} s")
