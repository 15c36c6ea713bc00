"""Whole-model export: every GLA form × fp32/fp16 × GQA/MHA × with/without short convolution.

Each export validates itself (gla_export.export.validate); these tests also check, without that
code, that the files are what docs/export.md promises and that the fp32 graphs match the model
run in float64 and stepping reproduces prefill.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from export_helpers import CONFIGS, EXTRA_CONFIGS, make_model, session

from gla_export.export import FORMAT_VERSION, export_model, read_metadata
from gla_export.export.metadata import METADATA_KEY
from gla_export.export.metadata import zero_state_feeds
from gla_export.testing import rel_err

FORMS = ["custom", "onnx", "decomposed"]


def _export(model, tmp_path, form, dtype="fp32", **kw):
    # custom graphs are validated with the Python reference op here; the native library runs
    # them in tests/export/test_native_runtime.py
    runtime = "reference" if form == "custom" else "auto"
    return export_model(model, tmp_path / "out", gla_op=form, dtype=dtype, progress=False, runtime=runtime, **kw)


def _check_files(out, meta, form):
    prefill, step = onnx.load(out / "prefill.onnx", load_external_data=False), onnx.load(out / "step.onnx", load_external_data=False)
    for kind, m in (("prefill", prefill), ("step", step)):
        onnx.checker.check_model(str(out / f"{kind}.onnx"), full_check=True)
        io = meta["graphs"][kind]
        assert [i.name for i in m.graph.input] == [i["name"] for i in io["inputs"]]
        assert [o.name for o in m.graph.output] == [o["name"] for o in io["outputs"]]
        props = {p.key: p.value for p in m.metadata_props}
        assert json.loads(props[METADATA_KEY]) == meta
        ops = {(n.domain, n.op_type) for n in m.graph.node}
        if form == "custom":
            assert ("gla", "GatedLinearAttention") in ops
        elif form == "onnx":
            assert ("", "LinearAttention") in ops
        else:
            assert all(d == "" for d, _ in ops) and ("", "LinearAttention") not in ops
            assert max(o.version for o in m.opset_import) <= 26
        # every initializer lives in the one shared weights file
        for init in m.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                assert {e.key: e.value for e in init.external_data}["location"] == "weights.onnx.data"
    assert [i.name for i in step.graph.input][0] == "input_ids"
    assert step.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1
    ext = lambda m: {i.name: tuple((e.key, e.value) for e in i.external_data) for i in m.graph.initializer if i.external_data}
    assert ext(prefill) == ext(step)  # both graphs point at the same bytes


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("form", FORMS)
def test_export_validates(tmp_path, form, config, dtype):
    model = make_model(config)
    res = _export(model, tmp_path, form, dtype)
    meta = read_metadata(res.out_dir)
    assert meta == res.metadata and meta["format_version"] == FORMAT_VERSION
    assert meta["padding"] == "left" and meta["padding_with_past"] is True
    assert res.validation.passed, res.validation.failures
    checked = {(c.case, c.output) for c in res.validation.checks}
    outputs = ["logits"] + [st["output"] for st in meta["states"]]
    for case in ("random", "continue", "padded", "padded-continue", "step"):
        assert all((case, o) in checked for o in outputs), case
    _check_files(res.out_dir, meta, form)
    kinds = {st["kind"] for st in meta["states"]}
    assert kinds == ({"recurrent_state", "conv_state"} if model.config.use_short_conv else {"recurrent_state"})


@pytest.mark.parametrize("config", ["gqa-conv", *EXTRA_CONFIGS])
@pytest.mark.parametrize("form", FORMS)
def test_fp32_graphs_match_float64_model_and_step_reproduces_prefill(tmp_path, form, config):
    model = make_model(config)
    res = _export(model, tmp_path, form, validate=False)
    meta = res.metadata
    c = model.config
    B, T = 2, 70
    ids = torch.randint(0, c.vocab_size, (B, T))
    with torch.no_grad():
        ref = model.double()(ids, gla_backend="naive")
    prefill, step = session(res.prefill_path, form), session(res.step_path, form)
    out = prefill({"input_ids": ids.numpy(), "attention_mask": np.ones((B, T), np.int64), **zero_state_feeds(meta, B)})
    assert rel_err(torch.from_numpy(out["logits"]), ref.logits) < 1e-5
    for st in meta["states"]:
        layer = ref.states[st["layer"]]
        want = layer.recurrent if st["kind"] == "recurrent_state" else layer.conv
        assert rel_err(torch.from_numpy(out[st["output"]]), want) < 1e-5, st["output"]

    states = zero_state_feeds(meta, B)
    logits = []
    for t in range(T):
        r = step({"input_ids": ids[:, t : t + 1].numpy(), **states})
        logits.append(r["logits"])
        states = {st["input"]: r[st["output"]] for st in meta["states"]}
    assert rel_err(torch.from_numpy(np.concatenate(logits, 1)), torch.from_numpy(out["logits"])) < 1e-5
    for st in meta["states"]:
        assert rel_err(torch.from_numpy(states[st["input"]]), torch.from_numpy(out[st["output"]])) < 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_left_padded_rows_get_their_own_results(tmp_path, form):
    model = make_model("gqa-conv")
    res = _export(model, tmp_path, form, validate=False)
    run = session(res.prefill_path, form)
    lens = [19, 6, 12]
    T = max(lens)
    rows = [torch.randint(0, model.config.vocab_size, (n,)) for n in lens]
    ids = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r.numpy()
        mask[i, T - len(r):] = 1
    batched = run({"input_ids": ids, "attention_mask": mask, **zero_state_feeds(res.metadata, 3)})
    for i, r in enumerate(rows):
        alone = run({"input_ids": r[None].numpy(), "attention_mask": np.ones((1, len(r)), np.int64), **zero_state_feeds(res.metadata, 1)})
        assert rel_err(torch.from_numpy(batched["logits"][i, T - len(r):]), torch.from_numpy(alone["logits"][0])) < 1e-5
        for st in res.metadata["states"]:
            assert rel_err(torch.from_numpy(batched[st["output"]][i]), torch.from_numpy(alone[st["output"]][0])) < 1e-5


def _left_padded(rows: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    T = max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r.numpy()
        mask[i, T - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("form", FORMS)
def test_left_padded_prefill_continuing_contexts_gives_each_row_its_own_results(tmp_path, form):
    """Rows of different lengths, then a second left-padded prefill continuing each row (its
    padding sits between the rows' convolution caches and their new tokens): every row's logits
    and final states, recurrent and conv, are those of the PyTorch model running that row alone.
    Continuations shorter than the convolution cache (1 token) and of no token at all included."""
    model = make_model("gqa-conv")
    res = _export(model, tmp_path, form, validate=False)
    meta = res.metadata
    run = session(res.prefill_path, form)
    V = model.config.vocab_size
    first = [torch.randint(0, V, (n,)) for n in (11, 4, 7, 9)]
    second = [torch.randint(0, V, (n,)) for n in (6, 1, 13, 0)]
    ids, mask = _left_padded(first)
    out = run({"input_ids": ids, "attention_mask": mask, **zero_state_feeds(meta, len(first))})
    ids, mask = _left_padded(second)
    out = run({"input_ids": ids, "attention_mask": mask, **{st["input"]: out[st["output"]] for st in meta["states"]}})
    T = ids.shape[1]
    for i, (a, b) in enumerate(zip(first, second)):
        with torch.no_grad():
            alone = model(torch.cat([a, b])[None])
        if len(b):
            assert rel_err(torch.from_numpy(out["logits"][i, T - len(b):]), alone.logits[0, len(a):]) < 1e-5, f"row {i}"
        for st in meta["states"]:
            layer = alone.states[st["layer"]]
            want = layer.recurrent if st["kind"] == "recurrent_state" else layer.conv
            assert rel_err(torch.from_numpy(out[st["output"]][i]), want[0]) < 1e-5, f"row {i}: {st['output']}"


def test_fp16_state_and_bf16_activations(tmp_path):
    model = make_model("gqa-conv")
    res = export_model(model, tmp_path / "a", gla_op="decomposed", dtype="fp16", state_dtype="fp16", progress=False)
    assert res.validation.passed
    assert {st["dtype"] for st in res.metadata["states"]} == {"float16"}
    res = export_model(model, tmp_path / "b", gla_op="custom", dtype="bf16", progress=False)
    assert res.validation.passed and res.validation.runtimes["prefill"].startswith("onnx.reference")
    rec = [st for st in res.metadata["states"] if st["kind"] == "recurrent_state"]
    assert {st["dtype"] for st in rec} == {"float32"}  # the state keeps its own type
    assert res.metadata["graphs"]["prefill"]["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 77]}
    # the caller's model is left in float32
    assert model.lm_head.weight.dtype == torch.float32
    res = export_model(model, tmp_path / "c", gla_op="onnx", state_dtype="bf16", progress=False)
    assert res.validation.passed and res.validation.runtimes["step"].startswith("onnx.reference")


def test_validation_can_fail(tmp_path, monkeypatch):
    """A graph that is slightly wrong (the decay off by 1 %) must fail validation, write nothing."""
    from gla_export.errors import ValidationError
    from gla_export.export import ExportValidationError, model_graph

    real = model_graph._log_sigmoid

    def off_by_one_percent(b, x):
        return b.op("Mul", [real(b, x), b.scalar(1.01, onnx.TensorProto.FLOAT)])

    monkeypatch.setattr(model_graph, "_log_sigmoid", off_by_one_percent)
    with pytest.raises(ExportValidationError) as e:
        export_model(make_model("mha"), tmp_path / "out", gla_op="decomposed", progress=False)
    assert isinstance(e.value, ValidationError) and e.value.exit_code == 4
    assert not e.value.report.passed and e.value.report.failures
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_low_precision_limits_follow_pytorch_in_that_dtype_unless_tolerances_are_given(tmp_path):
    model = make_model("gqa")
    res = export_model(model, tmp_path / "a", gla_op="decomposed", dtype="fp16", progress=False)
    assert res.validation.passed
    fixed = lambda c: res.validation.atol + res.validation.rtol * c.ref_max
    assert all(c.limit >= fixed(c) for c in res.validation.checks)
    assert all(c.allowance > 0 for c in res.validation.checks)  # PyTorch's own fp16 error was measured
    assert all(c.limit == max(fixed(c), c.allowance) for c in res.validation.checks)
    res = export_model(model, tmp_path / "b", gla_op="decomposed", dtype="fp16", atol=1e-2, rtol=1e-2, progress=False)
    assert all(c.limit == 1e-2 + 1e-2 * c.ref_max and c.allowance == 0 for c in res.validation.checks)
