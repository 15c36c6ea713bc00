"""The table of docs/edge.md: each published GLA size and weights format against the Jetson memories
and bandwidths (weights file, bytes read per decoded token, fits, decode floor).

    PYTHONPATH=$PWD python benchmarks/edge_table.py

Sizes come from :func:`gla_export.export.quantize.estimate_weights_bytes` (the model built on the
meta device, the export's rules applied; no file is written), with fp16 activations (fp16 scales).
The formats are the export defaults: ``--weights int8`` and ``--weights int4``.
"""

from __future__ import annotations

import math

from gla_export.export.quantize import estimate_weights_bytes, quant_config
from gla_export.models import recommended_config
from gla_export.models.builder import state_shapes

DEVICES = [  # name, memory bytes, bandwidth bytes/s
    ("Orin Nano 8 GB", 8e9, 68e9),
    ("Orin NX 16 GB", 16e9, 102e9),
    ("AGX Orin 64 GB", 64e9, 204.8e9),
    ("Thor 128 GB", 128e9, 273e9),
]
OS_BYTES, RUNTIME_BYTES = 3e9, 1e9  # left to the OS (shared memory); CUDA context, activations, workspace, states
FORMATS = ["fp", "int8", "int4"]


def label(cfg) -> str:
    if cfg is None:
        return "fp16"
    return f"{cfg.weights} b{cfg.block_size}"


def rows():
    out = []
    for size, name in (("340M", "GLA-340M"), ("1.3B", "GLA-1.3B")):
        c = recommended_config(size)
        n_params = None
        state = 0
        for _ in range(c.num_hidden_layers):
            for shape in state_shapes(c, 1).values():
                state += math.prod(shape) * 4  # fp32 state
        for weights in FORMATS:
            cfg = quant_config(weights)
            est = estimate_weights_bytes(c, cfg, act_bytes=2)
            if n_params is None:
                n_params = estimate_weights_bytes(c, None, act_bytes=1)["total"]
            emb_row = est["embedding"] / c.vocab_size
            read = est["total"] - est["embedding"] + emb_row + 2 * state
            cells = []
            for dev, mem, bw in DEVICES:
                left = mem - OS_BYTES - RUNTIME_BYTES - est["total"]
                ms = 1e3 * read / bw
                fit = f"fits ({left / 1e9:.1f} GB left)" if left >= 0 else f"does not fit ({-left / 1e9:.1f} GB short)"
                cells.append(f"{fit}; {ms:.1f} ms = {1e3 / ms:.0f} tok/s")
            out.append((f"{name} ({n_params / 1e6:.0f} M)", label(cfg), est["total"] / 1e9, read / 1e9, cells))
    return out


def main() -> None:
    head = ["model", "weights", "file (GB)", "read per token (GB)",
            *[f"{d} ({bw / 1e9:g} GB/s)" for d, _, bw in DEVICES]]
    print("| " + " | ".join(head) + " |")
    print("|---|---|---:|---:|" + "---|" * len(DEVICES))
    for model, lab, file_gb, read_gb, cells in rows():
        print(f"| {model} | {lab} | {file_gb:.2f} | {read_gb:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
