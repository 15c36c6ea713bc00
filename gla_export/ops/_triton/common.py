"""What both kernel families share: buffer allocation, block-size helpers, the SM count."""

from __future__ import annotations

import functools
import os

import torch
import triton

# Tests set this to fill every buffer the kernels write with NaN before the launch, so a
# position a kernel forgets to write (or a masked-out value that leaks) shows up as a failure.
POISON = False


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Power-of-two block covering ``n``; at least ``floor`` because tl.dot needs every dim >= 16."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``. Under the interpreter, 1: the largest blocks, because the
    interpreter pays per program and per operation; the code paths do not depend on it."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
