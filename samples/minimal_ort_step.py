#!/usr/bin/env python3
"""Greedy decoding of a gla-export export with nothing but onnxruntime and numpy.

    python samples/minimal_ort_step.py EXPORT_DIR --prompt "In the beginning" --max-new-tokens 64

What an app needs to drive ``step.onnx``, in one page: read ``metadata.json`` for the state
tensors, register our custom-op library when the export uses the ``custom`` GLA op, start
from zero states, then call the step graph once per token, feeding each call's ``present.*``
outputs back in as the next call's ``past_key_values.*`` inputs. Memory stays constant: the
states have a fixed size whatever the length of the conversation.

The prompt goes through the step graph too, one token at a time (simple; ``prefill.onnx``
reads a whole prompt in one call). The byte-level tokenizer of the sample model is two lines:
bytes in, bytes out, 256 = beginning of sequence, 257 = end of sequence.

The custom-op library: ``--ort-lib PATH``, else $GLA_ORT_LIB, else the one installed with the
gla-export Python package (found through ``gla_export.library_path``). On a device without
Python packages, copy ``libgla_onnxruntime.so`` along and pass its path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def find_ort_library(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("GLA_ORT_LIB"):
        return os.environ["GLA_ORT_LIB"]
    try:
        from gla_export import library_path  # only to locate the library; nothing else of gla_export is used
    except ImportError:
        sys.exit("this export uses the custom GLA op: pass --ort-lib /path/to/libgla_onnxruntime.so")
    return library_path("ort")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--prompt", default="In the beginning")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ort-lib", default=None, help="libgla_onnxruntime.so (for exports with the custom GLA op)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument("--print-ids", action="store_true", help="print the generated token ids instead of the text")
    args = ap.parse_args()

    meta = json.loads((args.export_dir / "metadata.json").read_text())
    if meta["tokenizer"]["kind"] != "byte":
        sys.exit("this sample speaks the byte-level tokenizer only (see gla_export.runtime.tokenizers for the others)")
    bos, eos = meta["tokenizer"]["bos_token_id"], meta["tokenizer"]["eos_token_id"]

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    if meta["gla_op"]["form"] == "custom":
        options.register_custom_ops_library(find_ort_library(args.ort_lib))
    elif meta["gla_op"]["form"] == "onnx":
        os.environ["ALLOW_RELEASED_ONNX_OPSET_ONLY"] = "0"  # LinearAttention is opset 27
    step_path = args.export_dir / meta["files"]["step"]
    step = ort.InferenceSession(str(step_path), options, providers=["CPUExecutionProvider"])

    # one conversation: batch 1; every state starts at zero (an empty context)
    states = {s["input"]: np.zeros([1, *s["shape"][1:]], dtype=NUMPY_DTYPES[s["dtype"]]) for s in meta["states"]}
    output_of = {s["output"]: s["input"] for s in meta["states"]}
    output_names = [o.name for o in step.get_outputs()]

    def feed(token: int) -> np.ndarray:
        """One step: the token in, the next-token logits out; the states move forward."""
        outputs = step.run(output_names, {"input_ids": np.array([[token]], dtype=np.int64), **states})
        for name, value in zip(output_names, outputs, strict=True):
            if name in output_of:
                states[output_of[name]] = value
        return outputs[output_names.index("logits")][0, -1]

    for token in [bos, *args.prompt.encode("utf-8")]:
        logits = feed(token)
    out = sys.stdout.buffer
    for _ in range(args.max_new_tokens):
        token = int(np.argmax(logits))
        if token == eos:
            break
        out.write(f"{token}\n".encode() if args.print_ids else bytes([token]) if token < 256 else b"")
        out.flush()
        logits = feed(token)
    if not args.print_ids:
        out.write(b"\n")


if __name__ == "__main__":
    main()
