#!/usr/bin/env python3
"""Load benchmark of ``gla-export serve`` driven by the official ``openai`` client.

    PYTHONPATH=. python benchmarks/bench_serve.py EXPORT_DIR [--backend ort-cpu] [--out bench-serve.json]

Starts the server on a free loopback port (or uses ``--url``), then for each concurrency level
(1, 4, 16, 64 by default) runs that many client threads, each doing two turns of a conversation:
a first request, then a follow-up whose prompt is the first turn's prompt, its answer and a new
line (the prefix cache should make it prefill only the new tokens). Reports aggregate decode
tokens/s, time to first token and inter-token latency (p50/p99, client side), the cache hit rate
and prefill tokens saved (server's /stats), the server's peak resident memory, and its CPU time
per generated token (all threads; it depends less than throughput on how busy a shared machine is).

Then the long-prompt scenario: 16 streams decode; after a baseline window, one request with a
prompt of ``--big-prompt-bytes`` (1 MB) arrives; the streams' inter-token p99 during its prefill
is compared with the baseline, and the server's peak memory with its ``--memory-limit``.

Everything is bounded: a fixed number of requests per level, ``--max-tokens`` per request, a
timeout on each, and the long prompt is abandoned (the client disconnects) after its window.
Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Server:
    def __init__(self, args):
        self.proc = None
        if args.url:
            self.url = args.url
            return
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-c", "from gla_export.cli import main; main()", "serve", args.export_dir, "--port", "0",
               "--backend", args.backend, "--memory-limit", args.memory_limit, "--max-queue", "512",
               "--max-tokens", "1000000",
               *(["--threads", str(args.threads)] if args.threads else []), *args.server_arg]
        self.log = open(args.server_log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            sys.exit(f"the server did not start: {line!r} (see {args.server_log})")
        self.url = line.split()[2]
        self.banner = line.strip()
        self.peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        import psutil

        p = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    def reset_peak(self) -> None:
        self.peak = 0

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (all its threads): its cost per token does not
        depend on how busy a shared machine is, as wall-clock throughput does."""
        if self.proc is None:
            return None
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/stats", timeout=30).json()

    def close(self) -> None:
        if self.proc is not None:
            self._stop.set()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def one_stream(client, model: str, prompt: str, max_tokens: int, rec: dict, stop_at: float | None = None) -> str:
    t0 = time.perf_counter()
    times, text = [], []
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True})
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            times.append(now)
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            rec["tokens"] += chunk.usage.completion_tokens
        if stop_at is not None and now > stop_at:
            stream.close()
            break
    if times:
        rec["ttft"].append(times[0] - t0)
        rec["itl"].extend((b - a, b) for a, b in zip(times, times[1:]))
    return "".join(text)


def run_level(server: Server, model: str, streams: int, max_tokens: int, timeout: float) -> dict:
    import openai

    rec = {"tokens": 0, "ttft": [], "itl": [], "errors": 0}
    lock = threading.Lock()
    before = server.stats()
    server.reset_peak() if server.proc else None
    cpu0 = server.cpu_seconds()

    def worker(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=timeout)
        local = {"tokens": 0, "ttft": [], "itl": []}
        try:
            prompt = f"Conversation {i}: In the beginning"
            answer = one_stream(client, model, prompt, max_tokens, local)
            one_stream(client, model, prompt + answer + "\nAnd then", max_tokens, local)  # a follow-up turn
        except Exception as e:  # noqa: BLE001
            print(f"stream {i}: {type(e).__name__}: {e}", file=sys.stderr)
            with lock:
                rec["errors"] += 1
        with lock:
            rec["tokens"] += local["tokens"]
            rec["ttft"] += local["ttft"]
            rec["itl"] += local["itl"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 2)
    wall = time.perf_counter() - t0
    cpu = server.cpu_seconds()
    after = server.stats()
    hits = after["cache"]["hits"] - before["cache"]["hits"]
    misses = after["cache"]["misses"] - before["cache"]["misses"]
    itl = [d for d, _ in rec["itl"]]
    return {
        "streams": streams, "requests": 2 * streams, "errors": rec["errors"], "wall_s": round(wall, 2),
        "tokens": rec["tokens"], "tokens_per_s": round(rec["tokens"] / wall, 1),
        "ttft_p50_ms": _ms(pct(rec["ttft"], 50)), "ttft_p99_ms": _ms(pct(rec["ttft"], 99)),
        "itl_p50_ms": _ms(pct(itl, 50)), "itl_p99_ms": _ms(pct(itl, 99)),
        "cache_hit_rate": round(hits / max(hits + misses, 1), 3),
        "prefill_tokens_saved": after["prefill_tokens_saved"] - before["prefill_tokens_saved"],
        "prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"],
        "peak_rss_mib": round(server.peak / 2**20, 1) if server.proc else None,
        "server_cpu_ms_per_token": round(1e3 * (cpu - cpu0) / max(rec["tokens"], 1), 3) if cpu is not None else None,
    }


def big_prompt(server: Server, model: str, streams: int, nbytes: int, window: float, timeout: float) -> dict:
    """``streams`` long streams; a baseline window; then a prompt of ``nbytes`` arrives."""
    import openai

    rec = {"tokens": 0, "ttft": [], "itl": []}
    lock = threading.Lock()
    t_start = time.perf_counter()
    marks: dict[str, float] = {}
    end_at = t_start + 3 * window + 5

    def worker(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=timeout)
        local = {"tokens": 0, "ttft": [], "itl": []}
        try:
            one_stream(client, model, f"Stream {i}: In the beginning", 1_000_000, local, stop_at=end_at)
        except Exception as e:  # noqa: BLE001
            print(f"stream {i}: {type(e).__name__}: {e}", file=sys.stderr)
        with lock:
            rec["itl"] += local["itl"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(window)  # warm-up: every stream past its prefill
    marks["baseline"] = time.perf_counter()
    server.reset_peak() if server.proc else None
    time.sleep(window)
    marks["big"] = time.perf_counter()
    before = server.stats()
    text = ("In the beginning God created the heaven and the earth. " * (nbytes // 56 + 1))[:nbytes]
    # a raw socket, so that the window can end by closing it (a blocking read in an HTTP client cannot
    # be interrupted from another thread); nothing arrives while the prompt is read
    import socket
    from urllib.parse import urlsplit

    body = json.dumps({"model": model, "prompt": text, "max_tokens": 1, "stream": True}).encode()
    u = urlsplit(server.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (u.hostname.encode(), len(body)) + body)
    reply = bytearray()

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                reply.extend(chunk)
                if b"[DONE]" in reply:
                    return
        except OSError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(max(marks["big"] + window - time.perf_counter(), 0))
    finished = b"[DONE]" in reply
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    reader.join(10)
    marks["end"] = time.perf_counter()
    read = server.stats()["prefill_tokens"] - before["prefill_tokens"]
    peak = server.peak
    for t in threads:
        t.join(timeout)
    base = [d for d, at in rec["itl"] if marks["baseline"] <= at < marks["big"]]
    during = [d for d, at in rec["itl"] if marks["big"] + 0.5 <= at < marks["end"]]
    return {"streams": streams, "big_prompt_bytes": nbytes, "window_s": round(marks["end"] - marks["big"], 2),
            "big_prompt_finished": finished,
            "baseline_itl_p50_ms": _ms(pct(base, 50)), "baseline_itl_p99_ms": _ms(pct(base, 99)),
            "during_itl_p50_ms": _ms(pct(during, 50)), "during_itl_p99_ms": _ms(pct(during, 99)),
            "p99_ratio": round(pct(during, 99) / pct(base, 99), 2) if base and during else None,
            "big_prompt_tokens_read_in_window": read,
            "peak_rss_mib": round(peak / 2**20, 1) if server.proc else None}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1e3 * x, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir")
    ap.add_argument("--backend", default="ort-cpu", choices=["ort-cpu", "ort-cuda", "trt"])
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="the server's ONNX Runtime threads")
    ap.add_argument("--memory-limit", default="2GiB")
    ap.add_argument("--big-prompt-bytes", type=int, default=1_000_000, help="0 skips the long-prompt scenario")
    ap.add_argument("--window", type=float, default=8.0, help="seconds of each window of the long-prompt scenario")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra option for gla-export serve")
    ap.add_argument("--server-log", default="bench-serve-server.log")
    ap.add_argument("--out", default="bench-serve.json")
    args = ap.parse_args()

    server = Server(args)
    try:
        import httpx

        info = httpx.get(f"{server.url}/health", timeout=30).json()
        model = info["model"]
        levels = []
        for n in (int(x) for x in args.levels.split(",")):
            r = run_level(server, model, n, args.max_tokens, args.timeout)
            levels.append(r)
            print(json.dumps(r), flush=True)
        big = None
        if args.big_prompt_bytes:
            big = big_prompt(server, model, 16, args.big_prompt_bytes, args.window, args.timeout)
            print(json.dumps(big), flush=True)
        one = next((r["tokens_per_s"] for r in levels if r["streams"] == 1), None)
        result = {"server": info, "levels": levels, "big_prompt": big,
                  "speedup_16_vs_1": round(next(r["tokens_per_s"] for r in levels if r["streams"] == 16) / one, 2)
                  if one and any(r["streams"] == 16 for r in levels) else None,
                  "load_average": os.getloadavg(), "cpus": os.cpu_count()}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n| streams | tokens/s | TTFT p50 / p99 ms | inter-token p50 / p99 ms | cache hit rate | "
              f"prefill saved | peak RSS MiB | server CPU ms/token |\n|---|---|---|---|---|---|---|---|")
        for r in levels:
            print(f"| {r['streams']} | {r['tokens_per_s']} | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} | "
                  f"{r['itl_p50_ms']} / {r['itl_p99_ms']} | {r['cache_hit_rate']} | {r['prefill_tokens_saved']:.0f} "
                  f"of {r['prefill_tokens'] + r['prefill_tokens_saved']:.0f} | {r['peak_rss_mib']} | "
                  f"{r['server_cpu_ms_per_token']} |")
        print(f"speedup 16 streams vs 1: {result['speedup_16_vs_1']}")
        if big:
            print(f"long prompt ({big['big_prompt_bytes']} bytes) during 16 streams: inter-token p99 "
                  f"{big['baseline_itl_p99_ms']} -> {big['during_itl_p99_ms']} ms (x{big['p99_ratio']}), "
                  f"{big['big_prompt_tokens_read_in_window']:.0f} of its tokens read in {big['window_s']} s, "
                  f"peak RSS {big['peak_rss_mib']} MiB (limit {info['memory']['limit'] / 2**20:.0f} MiB)")
    finally:
        server.close()


if __name__ == "__main__":
    main()
