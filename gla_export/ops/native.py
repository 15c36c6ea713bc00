"""The GLA op on our native kernels (libgla_kernels_capi, through ctypes), for CPU and CUDA tensors.

``native_gla`` has the signature and return convention of :func:`gla_export.ops.naive.naive_gla`;
it is the path the C++/CUDA kernel core is tested through from Python (the ONNX Runtime library and
the TensorRT plugin run the same kernels). CPU tensors run on the CPU kernels with
``torch.get_num_threads()`` threads; CUDA tensors run on the CUDA kernels on torch's current
stream, with a workspace from torch's caching allocator. The ``[B, T, H, D]`` tensors are passed
as the kernels' packed ``[B, T, H*D]`` layout (a view when they are contiguous).

Types: activations float32, float16 or bfloat16 (``g`` is cast to ``q``'s dtype), state float32,
float16 or bfloat16 (the initial state's dtype, float32 without one). float64 is not supported
by the kernels: use the ``naive`` or ``chunk`` backend for it.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from .._native import library_path
from ._common import GLADims, GLAShapeError, check_inputs, default_scale

__all__ = ["NativeKernelError", "cpu_isa", "cuda_compiled", "load_library", "native_gla"]

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_STATUS = {
    0: "ok",
    1: "invalid argument",
    2: "unsupported",
    3: "CUDA error",
    4: "workspace too small",
    5: "internal error",
}


class NativeKernelError(RuntimeError):
    """The native kernel refused the call; the message is the library's own explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(f"GLA kernel failed ({_STATUS.get(status, status)}): {message}")
        self.status = status


class Problem(ctypes.Structure):
    """Mirror of ``GlaProblem`` / ``gla::Problem`` (plugins/kernels/include/gla/capi.h)."""

    _fields_ = [
        ("batch", ctypes.c_int64),
        ("seq_len", ctypes.c_int64),
        ("num_seqs", ctypes.c_int64),
        ("q_heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("head_dim_k", ctypes.c_int32),
        ("head_dim_v", ctypes.c_int32),
        ("act_dtype", ctypes.c_int32),
        ("state_dtype", ctypes.c_int32),
        ("g_gamma_dtype", ctypes.c_int32),
        ("has_gate", ctypes.c_int32),
        ("gate_per_head", ctypes.c_int32),
        ("has_past_state", ctypes.c_int32),
        ("has_cu_seqlens", ctypes.c_int32),
        ("cu_seqlens_int64", ctypes.c_int32),
        ("has_g_gamma", ctypes.c_int32),
        ("reverse", ctypes.c_int32),
        ("scale", ctypes.c_float),
    ]


class Tensors(ctypes.Structure):
    """Mirror of ``GlaTensors`` / ``gla::Tensors``."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("query", "key", "value", "gate", "past_state", "cu_seqlens", "g_gamma", "output", "present_state")
    ]


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def load_library() -> ctypes.CDLL:
    """The C entry point, loaded once (raises gla_export.NativeLibraryError when it is not built)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(library_path("kernels"))
            P, T = ctypes.POINTER(Problem), ctypes.POINTER(Tensors)
            sig = {
                "gla_capi_version": (ctypes.c_int32, []),
                "gla_last_error_message": (ctypes.c_char_p, []),
                "gla_status_name": (ctypes.c_char_p, [ctypes.c_int32]),
                "gla_validate": (ctypes.c_int32, [P]),
                "gla_cpu_workspace_bytes": (ctypes.c_size_t, [P]),
                "gla_cpu_forward": (ctypes.c_int32, [P, T, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32]),
                "gla_cpu_isa": (ctypes.c_char_p, []),
                "gla_cuda_compiled": (ctypes.c_int32, []),
                "gla_cuda_workspace_bytes": (ctypes.c_size_t, [P]),
                "gla_cuda_forward": (ctypes.c_int32, [P, T, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
                "gla_cuda_workspace_bound": (ctypes.c_size_t, [P]),
            }
            for name, (res, args) in sig.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
            if lib.gla_capi_version() != 1:
                raise RuntimeError(f"{library_path('kernels')} has C API version {lib.gla_capi_version()}, expected 1")
            _lib = lib
        return _lib


def cuda_compiled() -> bool:
    """True when the native library was built with its CUDA kernels."""
    return bool(load_library().gla_cuda_compiled())


def cpu_isa() -> str:
    """The build of the CPU kernels that runs on this machine: ``avx512``, ``avx2``, ``neon`` (aarch64) or ``generic``."""
    return load_library().gla_cpu_isa().decode()


def _check(lib: ctypes.CDLL, status: int) -> None:
    if status != 0:
        raise NativeKernelError(status, lib.gla_last_error_message().decode(errors="replace"))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def make_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    dims: GLADims | None = None,
) -> Problem:
    """The kernel's Problem for these op arguments (``dims``: what check_inputs returned, if it ran)."""
    # the CUDA kernels read cu_seqlens on the device: no host read of its contents for CUDA tensors
    on_host = cu_seqlens is None or cu_seqlens.device.type == "cpu"
    dims = dims or check_inputs(q, k, v, g, initial_state, g_gamma, cu_seqlens, cu_contents=on_host)
    for name, t in (("q", q), ("initial_state", initial_state), ("g_gamma", g_gamma)):
        if t is not None and t.dtype not in _DTYPES:
            raise GLAShapeError(
                f"the native backend takes float32, float16 or bfloat16 for {name}, got {t.dtype} "
                "(use the naive or chunk backend for float64)"
            )
    return Problem(
        batch=dims.B,
        seq_len=dims.T,
        num_seqs=dims.N,
        q_heads=dims.Hq,
        kv_heads=dims.Hkv,
        head_dim_k=dims.K,
        head_dim_v=dims.V,
        act_dtype=_DTYPES[q.dtype],
        state_dtype=_DTYPES[initial_state.dtype] if initial_state is not None else 0,
        g_gamma_dtype=_DTYPES[g_gamma.dtype] if g_gamma is not None else 0,
        has_gate=int(g is not None),
        gate_per_head=int(dims.gate_per_head),
        has_past_state=int(initial_state is not None),
        has_cu_seqlens=int(cu_seqlens is not None),
        cu_seqlens_int64=int(cu_seqlens is not None and cu_seqlens.dtype == torch.int64),
        has_g_gamma=int(g_gamma is not None),
        reverse=int(bool(reverse)),
        scale=default_scale(scale, dims.K),
    )


def native_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    g_gamma: torch.Tensor | None = None,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    _dims: GLADims | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention on the native kernels; arguments and result as ``naive_gla``."""
    problem = make_problem(q, k, v, g, scale, initial_state, g_gamma, reverse, cu_seqlens, _dims)
    device = q.device
    tensors = {"q": q, "k": k, "v": v, "g": g, "initial_state": initial_state, "g_gamma": g_gamma, "cu_seqlens": cu_seqlens}
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise GLAShapeError(f"{name} is on {t.device} but q is on {device}")
    if device.type not in ("cpu", "cuda"):
        raise GLAShapeError(f"the native backend runs on CPU or CUDA tensors, got {device}")

    lib = load_library()
    # the kernels read dense row-major buffers; the gate shares the activations' dtype
    q_, k_, v_ = (t.contiguous() for t in (q, k, v))
    g_ = None if g is None else g.to(q.dtype).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    gamma = None if g_gamma is None else g_gamma.contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.contiguous()

    B, T, Hq, _ = q.shape
    o = torch.empty(B, T, Hq, v.shape[3], dtype=q.dtype, device=device)
    ht = torch.empty(problem.num_seqs, problem.kv_heads, problem.head_dim_k, problem.head_dim_v,
                     dtype=initial_state.dtype if initial_state is not None else torch.float32, device=device)
    ptrs = Tensors(
        query=_ptr(q_), key=_ptr(k_), value=_ptr(v_), gate=_ptr(g_), past_state=_ptr(h0),
        cu_seqlens=_ptr(cu), g_gamma=_ptr(gamma), output=_ptr(o), present_state=_ptr(ht),
    )  # fmt: skip

    if device.type == "cpu":
        nbytes = lib.gla_cpu_workspace_bytes(ctypes.byref(problem))
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        status = lib.gla_cpu_forward(
            ctypes.byref(problem), ctypes.byref(ptrs), workspace.data_ptr(), nbytes, torch.get_num_threads()
        )
        _check(lib, status)
    else:
        if not lib.gla_cuda_compiled():
            raise NativeKernelError(2, f"{library_path('kernels')} was built without CUDA kernels")
        with torch.cuda.device(device):
            nbytes = lib.gla_cuda_workspace_bytes(ctypes.byref(problem))
            # torch's allocator hands out 512-byte aligned blocks: the kernels' 256-byte rule holds
            workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            stream = torch.cuda.current_stream(device).cuda_stream
            status = lib.gla_cuda_forward(
                ctypes.byref(problem), ctypes.byref(ptrs), workspace.data_ptr(), nbytes, ctypes.c_void_p(stream)
            )
            _check(lib, status)
            # every temporary here was allocated on `stream`, so the caching allocator reuses it
            # only after the kernels queued before on that stream: no record_stream needed
    return o, (ht if output_final_state else None)
