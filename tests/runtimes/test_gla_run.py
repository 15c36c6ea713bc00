"""gla-run (runtimes/): greedy tokens against the exported graphs driven from Python and against
the PyTorch model, the metadata reader, errors and exit codes, and constant memory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import torch
from runtime_helpers import greedy_onnxruntime, greedy_pytorch, tiny_export, tiny_model

from gla_export._runner import find_gla_run, gla_run_command, run_gla_run
from gla_export.errors import MissingRuntimeError, ModelError, UsageError
from gla_export.export.metadata import METADATA_KEY, read_metadata


@pytest.fixture(scope="module", autouse=True)
def _built():
    # CI builds gla-run with the package: a missing binary is a failure, not a skip
    assert find_gla_run() is not None, "gla-run is not built (pip install . or cmake -S runtimes -B build/runner)"


def random_prompt(n: int) -> list[int]:
    return [256] + torch.randint(0, 256, (n - 1,)).tolist()


def decoder_tokens(export, prompt: list[int], n: int, ignore_eos: bool = True) -> list[int]:
    """Greedy tokens of the Python StatefulDecoder (gla_export.runtime.decoder)."""
    from gla_export.runtime.decoder import StatefulDecoder

    dec = StatefulDecoder(export, "ort-cpu")
    return dec.generate(prompt_ids=[prompt], max_new_tokens=n, ignore_eos=ignore_eos).run()[0].tokens


@pytest.mark.parametrize("form", ["decomposed", "custom"])
def test_tokens_match_the_python_decoder(form):
    export = tiny_export(form)
    for n in (2, 13):
        prompt = random_prompt(n)
        got = run_gla_run(export, ids=prompt, max_new_tokens=24, ignore_eos=True)
        assert got.prompt_ids == prompt and got.prefill is True
        assert got.ids == decoder_tokens(export, prompt, 24), f"prompt {prompt}"
        assert got.stop == "max_new_tokens"
        assert got.timing["decode_steps"] == 23  # no step is taken after the last token


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "stepped"])
@pytest.mark.parametrize("form", ["decomposed", "custom"])
def test_tokens_match_the_same_graph_calls_from_python(form, prefill):
    # the decoder always prefills (and runs a one-token prompt through the step graph): the stepped
    # path and a one-token prefill are checked against the very same graph calls made from Python
    export = tiny_export(form)
    for n in (1, 13):
        prompt = random_prompt(n)
        got = run_gla_run(export, ids=prompt, max_new_tokens=24, prefill=prefill, ignore_eos=True)
        assert got.prefill is prefill
        assert got.ids == greedy_onnxruntime(export, prompt, 24, prefill=prefill, stop_at_eos=False), f"prompt {prompt}"


def test_tokens_match_pytorch():
    export = tiny_export("decomposed")
    prompt = random_prompt(9)
    got = run_gla_run(export, ids=prompt, max_new_tokens=32, ignore_eos=True).ids
    want, margins = greedy_pytorch(tiny_model(), prompt, 32)
    # tokens must agree until PyTorch itself nearly ties (a 1e-3 logit margin is far above the
    # export's float32 error, so a disagreement before that is a bug)
    n = next((i for i, m in enumerate(margins) if m < 1e-3), len(margins))
    assert n >= 4, f"the reference ties too early to compare (margins {margins[:8]})"
    assert got[:n] == want[:n]


def test_prompt_text_and_bytes():
    export = tiny_export("decomposed")
    got = run_gla_run(export, prompt="Hé!", max_new_tokens=12, ignore_eos=True)
    assert got.prompt_ids == [256, 72, 0xC3, 0xA9, 33]
    assert got.ids == greedy_onnxruntime(export, got.prompt_ids, 12, stop_at_eos=False)
    assert got.data == bytes(i for i in got.ids if i < 256)
    if got.text is not None:
        assert got.text == got.data.decode("utf-8")
    else:
        with pytest.raises(UnicodeDecodeError):
            got.data.decode("utf-8")
    # the text format prints the same ids
    cmd = gla_run_command(export, prompt="Hé!", max_new_tokens=12, ignore_eos=True, fmt="text")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "ids: " + " ".join(map(str, got.ids))
    assert out[1].startswith("text: ")


def test_raw_format_streams_the_bytes():
    export = tiny_export("decomposed")
    prompt = random_prompt(5)
    ids = run_gla_run(export, ids=prompt, max_new_tokens=10, ignore_eos=True).ids
    cmd = gla_run_command(export, ids=prompt, max_new_tokens=10, ignore_eos=True, fmt="raw", extra_args=["--quiet"])
    out = subprocess.run(cmd, capture_output=True, check=True)
    assert out.stdout == bytes(i for i in ids if i < 256)
    assert out.stderr == b""


def _patched_export(tmp_path, src, edit_meta=None, drop_props=False, metadata_json: str | None = None):
    """A copy of an export whose graphs carry edited (or no) metadata_props."""
    dst = tmp_path / "patched"
    dst.mkdir()
    meta = read_metadata(src)
    if edit_meta:
        edit_meta(meta)
    for name in ("prefill.onnx", "step.onnx"):
        m = onnx.load(str(src / name), load_external_data=False)
        props = {p.key: p.value for p in m.metadata_props if p.key != METADATA_KEY}
        if not drop_props:
            props[METADATA_KEY] = json.dumps(meta)  # ASCII escapes, as the exporter writes it
        del m.metadata_props[:]
        onnx.helper.set_model_props(m, props)
        onnx.save(m, str(dst / name))
    shutil.copy2(src / "weights.onnx.data", dst / "weights.onnx.data")
    (dst / "metadata.json").write_text(
        metadata_json if metadata_json is not None else (src / "metadata.json").read_text()
    )
    return dst


def test_stops_at_eos_from_metadata_props(tmp_path):
    src = tiny_export("decomposed")
    prompt = random_prompt(7)
    full = greedy_onnxruntime(src, prompt, 16, stop_at_eos=False)
    eos = full[5]

    def edit(meta):
        meta["model"]["eos_token_id"] = eos
        meta["tokenizer"] = {"kind": "byte", "bos_token_id": 256, "eos_token_id": eos}
        meta["source"] = '/tmp/modèle \U0001f680 "quoted"\n'  # \u escapes and a surrogate pair for the reader

    # metadata.json keeps the real EOS: stopping at `eos` proves gla-run reads the model's metadata_props
    dst = _patched_export(tmp_path, src, edit)
    got = run_gla_run(dst, ids=prompt, max_new_tokens=16)
    first = full.index(eos)
    assert got.ids == full[: first + 1]
    assert got.stop == "eos"
    assert run_gla_run(dst, ids=prompt, max_new_tokens=16, ignore_eos=True).ids == full


def test_stops_at_any_listed_eos_id(tmp_path):
    # transformers' configs may list several end tokens; gla-run read only one integer (it refused a list)
    src = tiny_export("decomposed")
    prompt = random_prompt(7)
    full = greedy_onnxruntime(src, prompt, 16, stop_at_eos=False)
    eos = full[6]
    unseen = next(t for t in range(256) if t not in full)

    def edit(meta):
        meta["model"]["eos_token_id"] = [unseen, eos]
        meta["tokenizer"] = {"kind": "none"}

    dst = _patched_export(tmp_path, src, edit)
    got = run_gla_run(dst, ids=prompt, max_new_tokens=16)
    assert got.ids == full[: full.index(eos) + 1]
    assert got.stop == "eos"

    def bad(meta):
        meta["model"]["eos_token_id"] = [eos, "x"]
        meta["tokenizer"] = {"kind": "none"}

    (tmp_path / "bad").mkdir()
    bad_dst = _patched_export(tmp_path / "bad", src, bad)
    with pytest.raises(Exception, match="eos_token_id"):
        run_gla_run(bad_dst, ids=prompt, max_new_tokens=4)


def test_metadata_json_is_the_fallback_and_errors_name_the_byte(tmp_path):
    src = tiny_export("decomposed")
    prompt = random_prompt(4)
    dst = _patched_export(tmp_path, src, drop_props=True)
    assert run_gla_run(dst, ids=prompt, max_new_tokens=6, ignore_eos=True).ids == greedy_onnxruntime(
        src, prompt, 6, stop_at_eos=False
    )
    text = (src / "metadata.json").read_text()
    (dst / "metadata.json").write_text(text[:200])
    with pytest.raises(ModelError, match=r"metadata\.json: invalid JSON at byte 200: "):
        run_gla_run(dst, ids=prompt, max_new_tokens=2)
    (dst / "metadata.json").write_text(text.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(ModelError, match="format_version 99 is newer"):
        run_gla_run(dst, ids=prompt, max_new_tokens=2)
    bad = json.loads(text)
    bad["model"]["vocab_size"] = "258"
    (dst / "metadata.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="'model.vocab_size' must be an integer"):
        run_gla_run(dst, ids=prompt, max_new_tokens=2)


def test_graph_that_does_not_match_its_metadata(tmp_path):
    src = tiny_export("decomposed")

    def edit(meta):
        meta["states"][0]["shape"][1] += 1

    dst = _patched_export(tmp_path, src, edit)
    _, h, k, v = read_metadata(src)["states"][0]["shape"]
    with pytest.raises(
        ModelError,
        match=rf"step\.onnx input 'past_key_values\.0\.recurrent_state' has shape \[batch,{h},{k},{v}\], "
        rf"the metadata says \[batch,{h + 1},{k},{v}\]",
    ):
        run_gla_run(dst, ids=[256, 1], max_new_tokens=2)


def test_prompt_needs_the_byte_tokenizer(tmp_path):
    def edit(meta):
        meta["tokenizer"] = {"kind": "none"}

    dst = _patched_export(tmp_path, tiny_export("decomposed"), edit)
    with pytest.raises(UsageError, match="--prompt needs the byte-level tokenizer; this export's tokenizer is 'none'"):
        run_gla_run(dst, prompt="hi", max_new_tokens=2)


def _run(args, **kw):
    return subprocess.run([str(find_gla_run()), *args], capture_output=True, text=True, **kw)


def test_usage_errors_and_exit_codes(tmp_path):
    export = str(tiny_export("decomposed"))
    cases = [
        (["--export", export], 2, "give exactly one of --ids and --prompt"),
        (["--export", export, "--ids", "1", "--bogus"], 2, "unknown option '--bogus'"),
        (["--export", export, "--ids", "1,x"], 2, "--ids entry must be an integer, got 'x'"),
        (["--export", export, "--ids", "1", "--max-new-tokens", "-1"], 2, "--max-new-tokens must be >= 0"),
        (["--export", export, "--ids", "1", "--format", "xml"], 2, "--format must be text, json or raw"),
        (["--export", export, "--ids", "3,258", "--ort-lib", "x"], 5, "cannot load ONNX Runtime"),
    ]
    for args, code, msg in cases:
        r = _run(args, env={k: v for k, v in os.environ.items() if k != "GLA_RUN_ORT_LIB"})
        assert r.returncode == code, (args, r.stderr)
        assert msg in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("gla-run: error: ")
    assert _run(["--help"]).returncode == 0


def test_errors_through_the_python_wrapper(tmp_path):
    export = tiny_export("decomposed")
    with pytest.raises(UsageError, match=r"prompt token 1 is 258, outside the vocabulary \[0, 258\)"):
        run_gla_run(export, ids=[3, 258], max_new_tokens=2)
    with pytest.raises(UsageError, match="the prompt is empty"):
        run_gla_run(export, ids=[], max_new_tokens=2)
    with pytest.raises(ModelError, match="step.onnx does not exist"):
        run_gla_run(tmp_path, ids=[1], max_new_tokens=2)
    with pytest.raises(MissingRuntimeError, match="this ONNX Runtime has no CUDA execution provider"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            pytest.skip("onnxruntime-gpu is installed: covered by the GPU test")
        run_gla_run(export, ids=[1], max_new_tokens=2, provider="cuda")


def test_custom_export_without_the_library(tmp_path):
    export = tiny_export("custom")
    env = {k: v for k, v in os.environ.items() if k != "GLA_RUN_GLA_LIB"}
    cmd = gla_run_command(export, ids=[256, 1], max_new_tokens=2, gla_lib=str(tmp_path / "missing.so"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 5 and "--gla-lib" in r.stderr and "does not exist" in r.stderr


def test_tensorrt_path_fails_cleanly_without_tensorrt(tmp_path):
    export = tiny_export("decomposed")
    engine = tmp_path / "step.engine"
    engine.write_bytes(b"not an engine")
    r = _run(
        [
            "--export",
            str(export),
            "--ids",
            "1",
            "--engine",
            str(engine),
            "--trt-lib",
            str(tmp_path / "libnvinfer.so.10"),
        ]
    )
    assert r.returncode == 5, r.stderr
    assert "TensorRT" in r.stderr  # built with TensorRT: cannot load it; built without: says so


def _decode_growth_kib(cmd) -> int:
    """Resident KiB that gla-run added between the end of the prompt and the end of decoding
    (its own /proc/self/statm readings: a child's ru_maxrss would still count the Python parent
    it was forked from)."""
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    err = r.stderr.decode()
    m = re.search(r"resident (\d+) KiB after the prompt, (\d+) KiB at the end", err)
    assert m, err
    after_prompt, end = int(m.group(1)), int(m.group(2))
    assert after_prompt > 1000  # a real reading, not a placeholder
    return end - after_prompt


def test_memory_does_not_grow_with_generated_tokens():
    # two preallocated state buffers and nothing allocated per token (the raw format keeps no
    # token list either): decoding 8192 tokens adds no more memory than 16 (the first steps warm
    # ONNX Runtime up); a leak of 32 bytes a token would show as 256 KiB
    export = tiny_export("decomposed")

    def cmd(n):
        return gla_run_command(export, ids=[256, 1, 2], max_new_tokens=n, ignore_eos=True, threads=1, fmt="raw")

    short = min(_decode_growth_kib(cmd(16)) for _ in range(2))
    long = _decode_growth_kib(cmd(8192))
    assert long - short < 256, f"decoding added {short} KiB for 16 tokens, {long} KiB for 8192"


def test_state_bytes_are_the_metadata_states():
    export = tiny_export("decomposed")
    meta = read_metadata(export)
    want = sum(
        int(np.prod([d for d in st["shape"] if d != "batch"])) * np.dtype(st["dtype"]).itemsize for st in meta["states"]
    )
    assert run_gla_run(export, ids=[256], max_new_tokens=1).state_bytes == want


@pytest.mark.gpu
def test_cuda_provider_matches_cpu():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    for form in ("decomposed", "custom"):
        export = tiny_export(form)
        prompt = random_prompt(11)
        for prefill in (True, False):
            cpu = run_gla_run(export, ids=prompt, max_new_tokens=24, ignore_eos=True, prefill=prefill)
            cuda = run_gla_run(export, ids=prompt, max_new_tokens=24, ignore_eos=True, prefill=prefill, provider="cuda")
            assert "CUDAExecutionProvider" in cuda.backend
            # the same tokens as long as the CPU run is not near a tie
            want, margins = greedy_pytorch(tiny_model(), prompt, 24)
            n = next((i for i, m in enumerate(margins) if m < 1e-2), len(margins))
            assert cuda.ids[:n] == cpu.ids[:n]


@pytest.mark.gpu
def test_cuda_graph_step_matches_the_uncaptured_step():
    """--provider cuda replays the step as two captured CUDA graphs (the states ping-ponged):
    the same tokens as --no-cuda-graph, with and without the prefill graph."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    for form in ("decomposed", "custom"):
        export = tiny_export(form)
        prompt = random_prompt(9)
        for prefill in (True, False):
            cap = run_gla_run(export, ids=prompt, max_new_tokens=40, ignore_eos=True, prefill=prefill, provider="cuda",
                              extra_args=["--cuda-graph"])
            ref = run_gla_run(export, ids=prompt, max_new_tokens=40, ignore_eos=True, prefill=prefill, provider="cuda",
                              extra_args=["--no-cuda-graph"])
            assert "(CUDA graph)" in cap.backend, cap.backend
            assert "no CUDA graph" in ref.backend
            assert cap.ids == ref.ids


def test_no_cuda_graph_is_an_option_on_the_cpu_too():
    """Parsed everywhere (a no-op on the CPU provider), listed in --help."""
    export = tiny_export("decomposed")
    a = run_gla_run(export, ids=[256, 1, 2], max_new_tokens=4, ignore_eos=True, extra_args=["--cuda-graph"])
    b = run_gla_run(export, ids=[256, 1, 2], max_new_tokens=4, ignore_eos=True, extra_args=["--no-cuda-graph"])
    assert a.ids == b.ids and "CUDA graph" not in b.backend
