"""Helpers shared by the test suites and benchmarks: random GLA inputs, error measures."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# relative-norm tolerance of each activation dtype against the float64 reference
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


@dataclass
class GLACase:
    B: int = 2
    T: int = 63
    Hq: int = 4
    Hkv: int = 4
    K: int = 16
    V: int = 16
    dtype: torch.dtype = torch.float32
    initial_state: bool = False
    g_gamma: bool = False
    reverse: bool = False
    cu_seqlens: tuple[int, ...] | None = None
    gate_per_head: bool = False

    @property
    def id(self) -> str:
        name = {v: k for k, v in DTYPES.items()}[self.dtype]
        parts = [f"B{self.B}-T{self.T}-H{self.Hq}" + (f"kv{self.Hkv}" if self.Hkv != self.Hq else "") + f"-K{self.K}-V{self.V}-{name}"]
        parts += [flag for flag, on in (("h0", self.initial_state), ("gamma", self.g_gamma), ("rev", self.reverse), ("headgate", self.gate_per_head)) if on]
        if self.cu_seqlens is not None:
            parts.append("cu" + "_".join(map(str, self.cu_seqlens)))
        return "-".join(parts)


def make_inputs(case: GLACase, device: str | torch.device = "cpu", seed: int | None = None) -> dict:
    """Fresh random inputs for ``case`` (decay from logsigmoid, so ``g <= 0``), as the op's kwargs."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.seed() % (2**31))
    B = 1 if case.cu_seqlens is not None else case.B
    T = case.cu_seqlens[-1] if case.cu_seqlens is not None else case.T
    N = len(case.cu_seqlens) - 1 if case.cu_seqlens is not None else B

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    kw = dict(
        q=rnd(B, T, case.Hq, case.K),
        k=rnd(B, T, case.Hkv, case.K),
        v=rnd(B, T, case.Hkv, case.V),
        g=F.logsigmoid(rnd(B, T, case.Hkv, 1 if case.gate_per_head else case.K) + 2.0) * 0.5,
    )
    kw = {n: t.to(case.dtype).to(device) for n, t in kw.items()}
    if case.initial_state:
        kw["initial_state"] = rnd(N, case.Hkv, case.K, case.V).to(device)
    if case.g_gamma:
        kw["g_gamma"] = (-torch.rand(case.Hkv, generator=gen) * 0.2).to(device)
    if case.cu_seqlens is not None:
        kw["cu_seqlens"] = torch.tensor(case.cu_seqlens, dtype=torch.int32, device=device)
    kw["reverse"] = case.reverse
    return kw


def reference(kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive reference in float64 on the CPU for the same inputs."""
    from .ops.naive import naive_gla

    args = {n: (t.detach().cpu().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    if isinstance(args.get("cu_seqlens"), torch.Tensor):
        args["cu_seqlens"] = args["cu_seqlens"].cpu()
    return naive_gla(**args, output_final_state=True)


def rel_err(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """‖got − ref‖ / max(‖ref‖, floor), in float64; NaN or Inf anywhere gives inf."""
    got64, ref64 = got.detach().cpu().double(), ref.detach().cpu().double()
    if got64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(got64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(got64).all():
        return float("inf")
    return ((got64 - ref64).norm() / max(ref64.norm().item(), floor)).item()


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = rel_err(got, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def save_fla_checkpoint(config: dict, path, seed: int = 0) -> dict:
    """Build flash-linear-attention's own ``GLAForCausalLM`` from ``config`` (fla's ``GLAConfig``
    fields; an ``attn`` field makes a hybrid), perturb its norms and biases (fla initialises them
    to 1 and 0, which would hide a mix-up), and write it with fla's ``save_pretrained``.
    Returns the state dict written. fla's ``Attention`` refuses to be built without flash-attn
    (CUDA only); building it runs no kernel, so a stand-in is installed while it is built."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Triton is not supported.*")
    import fla.layers.attn as fla_attn
    from fla.models import GLAConfig as FlaConfig
    from fla.models import GLAForCausalLM as FlaModel

    saved = fla_attn.flash_attn_func
    fla_attn.flash_attn_func = saved or (lambda *a, **k: None)
    try:
        torch.manual_seed(seed)
        model = FlaModel(FlaConfig(**config))
    finally:
        fla_attn.flash_attn_func = saved
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def ort_gqa_problem() -> str | None:
    """Why this ONNX Runtime cannot run ``--attention-op gqa`` exports (None when it can): they
    give GroupQueryAttention the ``query_seqlens`` input, which its schema has from 1.32 on."""
    try:
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:
        return "onnxruntime is not installed"
    for s in get_all_operator_schema():
        if s.name == "GroupQueryAttention" and s.domain == "com.microsoft":
            if any(i.name == "query_seqlens" for i in s.inputs):
                return None
    return f"GroupQueryAttention of onnxruntime {ort.__version__} has no query_seqlens input (1.32 has)"
