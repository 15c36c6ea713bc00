"""Our Triton GLA kernels against flash-linear-attention on one GPU: accuracy and speed.

For each case, every implementation gets the same inputs; accuracy is the relative norm error
of the output and the final state against the float64 reference (gla_export.ops.naive, run on
the GPU), speed the median of triton.testing.do_bench. Cases (DESIGN.md §7):

    prefill-d128     B1 T8192 H16 d_k=d_v=128, fp16
    prefill-256x512  B1 T4096 H4 d_k256 d_v512, fp16
    decode-b16       B16 one step, H4 256×512, fp16 activations, fp32 state
    decode-b1        B1, same

Usage, on the GPU machine (fla-core/flash-linear-attention 0.6 installed):

    python benchmarks/bench_triton.py                      # every case, table on stdout
    python benchmarks/bench_triton.py --cases decode-b1,decode-b16 --rep 200
    OUT=/tmp/out python benchmarks/bench_triton.py         # also $OUT/bench_triton.json

"speedup" is the implementation's time over ours (above 1: ours is faster). "GB/s" counts the
bytes the op must move at least (inputs, output, state in and out) over the median time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    T: int
    H: int
    K: int
    V: int
    kind: str  # "prefill" or "decode"
    dtype: torch.dtype = torch.float16
    state_dtype: torch.dtype = torch.float32

    def bytes_moved(self) -> int:
        act = torch.finfo(self.dtype).bits // 8
        st = torch.finfo(self.state_dtype).bits // 8
        tokens = self.B * self.T * self.H
        io = tokens * (3 * self.K + 2 * self.V) * act  # q, k, g, v in; o out
        state = self.B * self.H * self.K * self.V * st * (2 if self.kind == "decode" else 1)
        return io + state


CASES = [
    Case("prefill-d128", B=1, T=8192, H=16, K=128, V=128, kind="prefill"),
    Case("prefill-256x512", B=1, T=4096, H=4, K=256, V=512, kind="prefill"),
    Case("decode-b16", B=16, T=1, H=4, K=256, V=512, kind="decode"),
    Case("decode-b1", B=1, T=1, H=4, K=256, V=512, kind="decode"),
]


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    ms: float | None
    err: float | None  # output, relative to the float64 reference
    note: str | None
    state_err: float | None = None
    gbps: float | None = None


def select_cases(spec: str) -> list[Case]:
    by_name = {c.name: c for c in CASES}
    if spec == "all":
        return list(CASES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ValueError(f"unknown case(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(by_name)} or 'all'")
    return [by_name[n] for n in names]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="all", help="comma-separated case names, or 'all' (default)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--no-fla", action="store_true", help="only our kernels")
    p.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference")
    p.add_argument("--json", default=None, help="JSON path (default $OUT/bench_triton.json when OUT is set)")
    args = p.parse_args(argv)
    try:
        select_cases(args.cases)
    except ValueError as e:
        p.error(str(e))
    return args


def make_inputs(case: Case, device: str = "cuda", seed: int = 0) -> dict:
    """Random inputs as in gla_export.testing: g from logsigmoid (≤ 0); a random fp32 state for decode."""
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    kw = dict(
        q=rnd(B, T, H, K).to(case.dtype),
        k=rnd(B, T, H, K).to(case.dtype),
        v=rnd(B, T, H, V).to(case.dtype),
        g=(F.logsigmoid(rnd(B, T, H, K) + 2.0) * 0.5).to(case.dtype),
    )
    kw["initial_state"] = rnd(B, H, K, V).to(case.state_dtype) if case.kind == "decode" else None
    return kw


def implementations(no_fla: bool) -> list[tuple[str, object]]:
    """(name, fn(q, k, v, g, initial_state) -> (o, final state)) for ours and fla's."""
    from gla_export.ops.triton_gla import triton_gla

    impls: list[tuple[str, object]] = [
        ("ours", lambda q, k, v, g, h0: triton_gla(q, k, v, g, initial_state=h0, output_final_state=True)),
    ]
    if no_fla:
        return impls
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
    except Exception as e:  # reported in the table, the run goes on
        err = f"{type(e).__name__}: {e}"
        return impls + [("fla chunk_gla", err), ("fla fused_recurrent_gla", err)]
    impls += [
        ("fla chunk_gla", lambda q, k, v, g, h0: chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)),
        ("fla fused_recurrent_gla", lambda q, k, v, g, h0: fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, output_final_state=True)),
    ]
    return impls


def reference(kw: dict):
    from gla_export.ops.naive import naive_gla

    args = {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return naive_gla(**args, output_final_state=True)


def run_case(case: Case, args: argparse.Namespace, device: str = "cuda", bench=None) -> list[Row]:
    """Rows for every implementation; ``bench`` replaces triton.testing.do_bench (tests)."""
    import triton.testing

    from gla_export.testing import rel_err

    bench = bench or triton.testing.do_bench
    kw = make_inputs(case, device)
    ref, ref_note = None, None
    if not args.no_accuracy:
        try:
            ref = reference(kw)
        except Exception as e:  # timings are still worth having
            ref_note = f"no reference: {type(e).__name__}: {e}".splitlines()[0][:160]
            traceback.print_exc(file=sys.stderr)
    rows = []
    for name, fn in implementations(args.no_fla):
        if isinstance(fn, str):
            rows.append(Row(case.name, name, None, None, fn))
            continue
        try:
            with torch.inference_mode():
                o, s = fn(kw["q"], kw["k"], kw["v"], kw["g"], kw["initial_state"])
                err = s_err = None
                if ref is not None:
                    err, s_err = rel_err(o, ref[0]), rel_err(s.float(), ref[1])
                ms = bench(
                    lambda: fn(kw["q"], kw["k"], kw["v"], kw["g"], kw["initial_state"]),
                    warmup=args.warmup, rep=args.rep, return_mode="median",
                )
            rows.append(Row(case.name, name, ms, err, ref_note, s_err, case.bytes_moved() / (ms * 1e-3) / 1e9))
        except Exception as e:
            rows.append(Row(case.name, name, None, None, f"{type(e).__name__}: {e}".splitlines()[0][:160]))
            traceback.print_exc(file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    ours = {r.case: r.ms for r in rows if r.impl == "ours" and r.ms is not None}
    head = ["case", "implementation", "median ms", "speedup", "GB/s", "out err", "state err", "note"]
    lines = []
    for r in rows:
        speed = f"{r.ms / ours[r.case]:.2f}x" if r.ms is not None and r.case in ours else "-"
        lines.append([r.case, r.impl, _fmt(r.ms, ".4f"), speed, _fmt(r.gbps, ".0f"), _fmt(r.err, ".2e"), _fmt(r.state_err, ".2e"), r.note or ""])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def write_json(rows: list[Row], meta: dict, path: str | None = None) -> str | None:
    if path is None:
        if not os.environ.get("OUT"):
            return None
        path = os.path.join(os.environ["OUT"], "bench_triton.json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return path


def _meta() -> dict:
    import triton

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    try:
        import fla

        meta["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        meta["fla"] = None
    return meta


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton.py needs a CUDA GPU (run it on the GPU machine)", file=sys.stderr)
        sys.exit(2)
    rows = []
    for case in select_cases(args.cases):
        rows += run_case(case, args)
        print(format_table([r for r in rows if r.case == case.name]) + "\n", flush=True)
    meta = _meta()
    print(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}")
    print(format_table(rows))
    path = write_json(rows, meta, args.json)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
