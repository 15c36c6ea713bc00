"""Triton kernels behind :mod:`gla_export.ops.triton_gla`: the chunked prefill (chunk.py) and the
fused recurrent step (recurrent.py). Launchers take contiguous tensors that the public function
has already validated."""
