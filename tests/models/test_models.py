"""The model: fla-identical parameters, recurrent consistency, padding, loader errors."""

import json

import pytest
import torch

from gla_export.models import (
    CheckpointError,
    ConfigError,
    GLAConfig,
    GLAForCausalLM,
    build_model,
    count_parameters,
    load_model,
    make_config,
    output_size,
    recommended_config,
    save_model,
)
from gla_export.testing import rel_err

CONFIGS = {
    "base": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=2),
    "gqa-conv-tied": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, use_short_conv=True, tie_word_embeddings=True),
    "unfused-wide": dict(vocab_size=101, hidden_size=96, num_hidden_layers=1, num_heads=3, fuse_norm=False, expand_k=1.0, expand_v=2.0, intermediate_size=200),
    "no-output-gate": dict(vocab_size=101, hidden_size=64, num_hidden_layers=1, num_heads=2, use_output_gate=False, clamp_min=-4.0),
    "mqa-conv3": dict(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_heads=3, num_kv_heads=1, use_short_conv=True, conv_size=3, hidden_ratio=3),
}


def _fla():
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install '.[test]')")
    import warnings

    warnings.filterwarnings("ignore", message=".*Triton is not supported.*")
    from fla.models import GLAConfig as FlaConfig
    from fla.models import GLAForCausalLM as FlaModel

    return FlaConfig, FlaModel


@pytest.mark.parametrize("name", CONFIGS)
def test_parameters_match_fla(name):
    FlaConfig, FlaModel = _fla()
    kwargs = CONFIGS[name]
    theirs = {k: tuple(v.shape) for k, v in FlaModel(FlaConfig(**kwargs)).state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in GLAForCausalLM(GLAConfig(**kwargs)).state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("name", CONFIGS)
def test_fla_checkpoint_loads(tmp_path, name):
    FlaConfig, FlaModel = _fla()
    from safetensors.torch import save_file

    fla_model = FlaModel(FlaConfig(**CONFIGS[name]))
    sd = {k: v.contiguous() for k, v in fla_model.state_dict().items()}
    if fla_model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    fla_model.config.save_pretrained(tmp_path)  # writes config.json the way fla/HF does
    model = load_model(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fla_model.state_dict()[key].float()), key


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_steps_match_full_forward(name):
    model = GLAForCausalLM(GLAConfig(**CONFIGS[name])).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :20])
        logits, states = [out.logits], out.states
        for t in range(20, 37):
            out = model(ids[:, t : t + 1], states=states)
            logits.append(out.logits)
            states = out.states
    assert rel_err(torch.cat(logits, 1), full) < 1e-5


@pytest.mark.parametrize("name", ["base", "gqa-conv-tied"])
def test_left_padding_gives_each_row_its_own_result(name):
    model = GLAForCausalLM(GLAConfig(**CONFIGS[name])).eval()
    lens = [23, 9]
    seqs = [torch.randint(0, 101, (n,)) for n in lens]
    T = max(lens)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = s
        mask[i, T - len(s) :] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = model(s[None])
            assert rel_err(batched.logits[i, T - len(s) :], alone.logits[0]) < 1e-5
            for lb, la in zip(batched.states, alone.states):
                assert rel_err(lb.recurrent[i], la.recurrent[0]) < 1e-5
                if la.conv is not None:
                    assert rel_err(lb.conv[i], la.conv[0]) < 1e-5


def _left_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = s
        mask[i, T - len(s) :] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["base", "gqa-conv-tied", "mqa-conv3"])
def test_left_padded_prefill_continuing_contexts_gives_each_row_its_own_result(name):
    """Rows of different lengths, then a second left-padded prefill continuing each row: the
    padding of the second call sits between the rows' cached convolution inputs and their new
    tokens and must not reach the windows. Continuations shorter than the convolution cache
    (1 token) and an all-padding row (0 tokens: its states stay as they were) included."""
    torch.manual_seed(3)
    model = GLAForCausalLM(GLAConfig(**CONFIGS[name], initializer_range=0.3)).eval()
    V = model.config.vocab_size
    first = [torch.randint(0, V, (n,)) for n in (11, 4, 7, 9)]
    second = [torch.randint(0, V, (n,)) for n in (6, 1, 13, 0)]
    with torch.no_grad():
        ids, mask = _left_padded(first)
        out1 = model(ids, attention_mask=mask, states=model.init_states(len(first)))
        ids, mask = _left_padded(second)
        out2 = model(ids, attention_mask=mask, states=out1.states)
        T = ids.shape[1]
        for i, (a, b) in enumerate(zip(first, second)):
            alone = model(torch.cat([a, b])[None])
            if len(b):
                assert rel_err(out2.logits[i, T - len(b) :], alone.logits[0, len(a) :]) < 1e-5, f"row {i}"
            for layer, (lb, la) in enumerate(zip(out2.states, alone.states)):
                assert rel_err(lb.recurrent[i], la.recurrent[0]) < 1e-5, f"row {i} layer {layer}"
                if la.conv is not None:
                    assert rel_err(lb.conv[i], la.conv[0]) < 1e-5, f"row {i} layer {layer} conv"


def test_short_conv_model_refuses_a_mask_that_is_not_left_padding():
    model = GLAForCausalLM(GLAConfig(**CONFIGS["gqa-conv-tied"])).eval()
    ids = torch.randint(0, 101, (2, 5))
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"attention_mask \(shape \[2, 5\]\).*left"):
        model(ids, attention_mask=right)
    with pytest.raises(ValueError, match=r"attention_mask \(shape \[2, 3\]\)"):
        model(ids, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with torch.no_grad():  # a boolean mask and a mask covering the past as well are fine
        model(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool))
        model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long))


def test_save_and_load_round_trip(tmp_path):
    model = build_model(vocab_size=64, embed_dim=64, num_layers=2, num_heads=2, tie_word_embeddings=True)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight is loaded.model.embeddings.weight


def test_fused_and_unfused_norm_names_both_load(tmp_path):
    fused = GLAForCausalLM(GLAConfig(**CONFIGS["base"]))
    save_model(fused, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["fuse_norm"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    unfused = load_model(tmp_path)
    assert hasattr(unfused.model.layers[0].attn, "g_norm")
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert rel_err(unfused(ids).logits, fused.eval()(ids).logits) < 1e-6


def _checkpoint(tmp_path):
    save_model(GLAForCausalLM(GLAConfig(**CONFIGS["base"])), tmp_path)
    return tmp_path


def test_unknown_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _checkpoint(tmp_path)
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.attn.mystery.weight"] = torch.zeros(3)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown weight 'model.layers.0.attn.mystery.weight'"):
        load_model(path)


def test_missing_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _checkpoint(tmp_path)
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.attn.gk_proj.1.bias"]
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing weight 'model.layers.1.attn.gk_proj.1.bias'"):
        load_model(path)


def test_misshapen_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _checkpoint(tmp_path)
    sd = load_file(path / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' has shape \\[7\\]"):
        load_model(path)


def test_pickled_checkpoint_is_refused_unread(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["base"]))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    with pytest.raises(CheckpointError, match="pickled checkpoint; only safetensors"):
        load_model(tmp_path)


def test_corrupt_safetensors_is_refused(tmp_path):
    path = _checkpoint(tmp_path)
    (path / "model.safetensors").write_bytes(b"garbage that is not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(path)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("attn", {"layers": [99], "num_heads": 4}, "'attn'"),  # hybrids load (test_hybrid.py); a bad spec is named
        ("hidden_act", "gelu", "'hidden_act'"),
        ("feature_map", "relu", "'feature_map'"),
        ("model_type", "mamba", "'model_type'"),
        ("num_kv_heads", 3, "'num_kv_heads'"),
    ],
)
def test_unsupported_config_values_are_named(tmp_path, field, value, match):
    cfg = dict(CONFIGS["base"], **{field: value})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        load_model(tmp_path)


def test_sharded_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    model = GLAForCausalLM(GLAConfig(**CONFIGS["base"]))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    model.config.to_json(tmp_path / "config.json")
    loaded = load_model(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())


def test_builder_and_sizes():
    cfg = make_config(vocab_size=300, embed_dim=128, hidden_size=320, num_layers=3, num_heads=4, head_dim=16, dropout=0.1)
    assert (cfg.head_k_dim, cfg.head_v_dim, cfg.mlp_intermediate_size, cfg.dropout) == (16, 32, 320, 0.1)
    model = GLAForCausalLM(cfg)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg) == count_parameters(model)
    assert output_size(cfg) == 300
    assert recommended_config("1.3B").head_k_dim == 256 and recommended_config("1.3B").head_v_dim == 512
    assert 300e6 < count_parameters(recommended_config("340M")) < 400e6
