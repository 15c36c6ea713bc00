"""Atomic writing (nothing partial, nothing clobbered without --force) and typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_helpers import make_model

from gla_export.errors import ExportFailedError, ModelError, OutputExistsError, UsageError
from gla_export.export import export_model, read_metadata
from gla_export.export.graph import WeightTable
from gla_export.models import GLAConfig, GLAForCausalLM, save_model


def _quick(model, out, **kw):
    return export_model(model, out, gla_op="decomposed", validate=False, progress=False, **kw)


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_existing_output_needs_force_and_is_left_alone(tmp_path):
    out = tmp_path / "out"
    _quick(make_model("mha"), out)
    before = _snapshot(out)
    with pytest.raises(OutputExistsError, match="use --force"):
        _quick(make_model("gqa"), out)
    assert _snapshot(out) == before
    res = _quick(make_model("gqa"), out, force=True)
    assert res.metadata["model"]["num_kv_heads"] == 2
    assert json.loads((out / "metadata.json").read_text())["model"]["num_kv_heads"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup directory left


def test_empty_directory_is_used_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    _quick(make_model("mha"), tmp_path / "out")
    assert (tmp_path / "out" / "prefill.onnx").is_file()


def test_force_never_replaces_a_directory_that_is_not_an_export(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match="not a gla-export directory"):
        _quick(make_model("mha"), out, force=True)
    assert (out / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        _quick(make_model("mha"), tmp_path / "file", force=True)


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_nothing_and_keeps_the_old_export(tmp_path, monkeypatch, failure):
    out = tmp_path / "out"
    _quick(make_model("mha"), out)
    before = _snapshot(out)
    real_write = WeightTable.write

    def write_then_fail(self, directory, on_tensor=None):
        real_write(self, directory, on_tensor)  # a complete weights file exists in the temp dir now
        raise failure

    monkeypatch.setattr(WeightTable, "write", write_then_fail)
    with pytest.raises(ExportFailedError if isinstance(failure, OSError) else KeyboardInterrupt):
        _quick(make_model("gqa"), out, force=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_usage_errors_name_the_option(tmp_path):
    m = make_model("mha")
    with pytest.raises(UsageError, match="gla_op must be one of custom, onnx, decomposed"):
        export_model(m, tmp_path / "o", gla_op="fast", progress=False)
    with pytest.raises(UsageError, match=r"--opset 21 is not valid for --gla-op onnx: use 27\.\."):
        export_model(m, tmp_path / "o", gla_op="onnx", opset=21, progress=False)
    with pytest.raises(UsageError, match=r"--opset 27 is not valid for --gla-op decomposed: use 18\.\.26"):
        export_model(m, tmp_path / "o", gla_op="decomposed", opset=27, progress=False)
    with pytest.raises(UsageError, match="dtype must be one of fp32, fp16, bf16, got 'int8'"):
        export_model(m, tmp_path / "o", dtype="int8", progress=False)
    with pytest.raises(UsageError, match="atol and rtol must be >= 0"):
        export_model(m, tmp_path / "o", atol=-1, progress=False)
    with pytest.raises(UsageError, match="max_batch must be a positive integer"):
        export_model(m, tmp_path / "o", max_batch=0, progress=False)
    with pytest.raises(UsageError, match="checkpoint directory or a GLAForCausalLM"):
        export_model(42, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match="checkpoint not found"):
        export_model(tmp_path / "nope", tmp_path / "o", progress=False)
    ckpt = tmp_path / "ckpt"
    save_model(GLAForCausalLM(GLAConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=2)), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="hidden_act"):
        export_model(ckpt, tmp_path / "o", progress=False)
    bad = GLAForCausalLM(GLAConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=2, use_short_conv=True, conv_size=1))
    with pytest.raises(ModelError, match="conv_size"):
        export_model(bad, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_checkpoint_directory_and_shape_hints(tmp_path):
    model = make_model("gqa-conv")
    save_model(model, tmp_path / "ckpt")
    res = export_model(tmp_path / "ckpt", tmp_path / "out", gla_op="decomposed", max_batch=4, max_seq_len=512,
                       progress=False)
    assert res.validation.passed
    meta = res.metadata
    assert meta["source"] == str((tmp_path / "ckpt").resolve())
    assert meta["shape_hints"] == {"batch": {"min": 1, "opt": 1, "max": 4}, "sequence": {"min": 1, "opt": 128, "max": 512}}
    assert meta["tokenizer"] == {"kind": "none"}
    assert meta["model"]["num_parameters"] == sum(p.numel() for p in model.parameters())  # tied weights once


def test_source_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    save_model(make_model("mha"), tmp_path / "work" / "ckpt")
    monkeypatch.chdir(tmp_path / "work")
    res = export_model("ckpt", "../out", gla_op="decomposed", validate=False, progress=False)
    want = str((tmp_path / "work" / "ckpt").resolve())
    assert res.metadata["source"] == want and read_metadata(tmp_path / "out")["source"] == want
    monkeypatch.chdir(tmp_path)  # elsewhere, the recorded path still names the checkpoint
    assert (Path(res.metadata["source"]) / "config.json").is_file()


def test_no_attention_mask(tmp_path):
    res = export_model(make_model("conv"), tmp_path / "o", gla_op="decomposed", attention_mask=False, progress=False)
    assert res.validation.passed
    names = [i["name"] for i in res.metadata["graphs"]["prefill"]["inputs"]]
    assert "attention_mask" not in names and res.metadata["padding"] is None
    assert res.metadata["padding_with_past"] is None
    assert {c.case for c in res.validation.checks} == {"random", "continue", "step"}


def test_byte_tokenizer_runs_the_real_sentence(tmp_path):
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(vocab_size=258, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                     bos_token_id=256, eos_token_id=257)).eval()
    res = export_model(model, tmp_path / "o", gla_op="decomposed", progress=False)
    assert res.metadata["tokenizer"] == {"kind": "byte", "bos_token_id": 256, "eos_token_id": 257}
    assert "real" in {c.case for c in res.validation.checks}


def test_huggingface_tokenizer_is_copied_and_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", ",", "and", "keeps", "on", "sleeping", "in", "sun", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = GLAForCausalLM(GLAConfig(vocab_size=len(vocab) + 3, hidden_size=32, num_hidden_layers=1, num_heads=2)).eval()
    save_model(model, tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    res = export_model(tmp_path / "ckpt", tmp_path / "out", gla_op="decomposed", progress=False)
    assert res.metadata["tokenizer"] == {"kind": "huggingface", "files": ["tokenizer.json"]}
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "ckpt" / "tokenizer.json").read_bytes()
    assert "real" in {c.case for c in res.validation.checks}


def test_the_bundled_sample_model_is_the_default(tmp_path):
    from gla_export.models import sample_model_path

    if not (sample_model_path() / "config.json").is_file():
        pytest.skip("the sample model is not bundled in this checkout")
    res = export_model(None, tmp_path / "out", gla_op="decomposed", progress=False)
    assert res.validation.passed and res.metadata["tokenizer"]["kind"] == "byte"
    assert "real" in {c.case for c in res.validation.checks}


def test_gla_export_export_stays_callable(tmp_path):
    """``gla_export.export(...)`` forwards to export_model, also after the subpackage is imported."""
    import gla_export
    import gla_export.export

    for name in ("a", "b"):
        res = gla_export.export(make_model("mha"), tmp_path / name, gla_op="decomposed", validate=False, progress=False)
        assert res.prefill_path.is_file()


def test_written_weights_keep_no_reference_to_the_model(tmp_path):
    """After writing, the weight table must not keep the model's tensors alive (validation frees
    the model before the runtimes load the graphs)."""
    import gc
    import weakref

    from gla_export.export.model_graph import register_weights

    model = make_model("conv")
    table = WeightTable("w.data")
    register_weights(model, table)
    table.write(tmp_path)
    ref = weakref.ref(model.model.layers[0].attn.q_proj.weight)
    del model
    gc.collect()
    assert ref() is None
    assert (tmp_path / "w.data").stat().st_size >= table.nbytes
