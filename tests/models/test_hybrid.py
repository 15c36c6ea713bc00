"""Hybrid GLA + softmax-attention models (fla's config field ``attn``): fla checkpoints load
unchanged; the attention layer matches an independent SDPA reference built from fla's own rotary
tables and flash-attn's window rule; incremental decoding and padded batches match the full forward."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from gla_export.models import ConfigError, GLAConfig, GLAForCausalLM, load_model
from gla_export.models.modeling import Attention
from gla_export.testing import rel_err, save_fla_checkpoint

ATTN_CASES = {
    "full-gqa-bias": dict(layers=[0], num_heads=4, num_kv_heads=2, qkv_bias=True),
    "window3": dict(layers=[0], num_heads=2, window_size=3, rope_theta=500.0),
    "window1-mqa": dict(layers=[0], num_heads=4, num_kv_heads=1, window_size=1),
}


@contextlib.contextmanager
def fla_attention_buildable():
    """fla's Attention refuses to build without flash-attn (CUDA only); building it needs no kernel."""
    fla_attn = pytest.importorskip("fla.layers.attn", reason="flash-linear-attention is not installed")
    saved = fla_attn.flash_attn_func
    fla_attn.flash_attn_func = saved or (lambda *a, **k: None)
    try:
        yield fla_attn
    finally:
        fla_attn.flash_attn_func = saved


def reference_attention(fla_layer, x: torch.Tensor) -> torch.Tensor:
    """fla's Attention on one unpadded row, with fla's rotary tables and reference rotation and
    flash-attn's ``window_size=(W-1, 0)`` rule (query i sees keys i-W+1 .. i), in float64 SDPA."""
    from fla.modules.rotary.ops import rotary_embedding_ref

    B, T, _ = x.shape
    a = fla_layer
    q = a.q_proj(x).view(B, T, a.num_heads, a.head_dim)
    k = a.k_proj(x).view(B, T, a.num_kv_heads, a.head_dim)
    v = a.v_proj(x).view(B, T, a.num_kv_heads, a.head_dim)
    a.rotary._update_cos_sin_cache(T, device=x.device, dtype=x.dtype)
    cos, sin = a.rotary._cos_cached[:T], a.rotary._sin_cached[:T]
    q, k = rotary_embedding_ref(q, cos, sin), rotary_embedding_ref(k, cos, sin)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = j <= i
    if a.window_size is not None:
        allowed &= j >= i - (a.window_size - 1)
    g = a.num_heads // a.num_kv_heads
    o = F.scaled_dot_product_attention(q.transpose(1, 2).double(), k.transpose(1, 2).double().repeat_interleave(g, 1),
                                       v.transpose(1, 2).double().repeat_interleave(g, 1), attn_mask=allowed)
    return a.o_proj(o.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_layer_matches_fla_layer_reference(case):
    spec = ATTN_CASES[case]
    with fla_attention_buildable():
        from fla.layers.attn import Attention as FlaAttention

        torch.manual_seed(0)
        fla = FlaAttention(hidden_size=32, num_heads=spec["num_heads"], num_kv_heads=spec.get("num_kv_heads"),
                           qkv_bias=spec.get("qkv_bias", False), window_size=spec.get("window_size"),
                           rope_theta=spec.get("rope_theta", 10000.0), layer_idx=0)
    with torch.no_grad():
        for p in fla.parameters():
            p.normal_()
    cfg = GLAConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_heads=2, attn=spec)
    ours = Attention(cfg, 0)
    ours.load_state_dict(fla.state_dict(), strict=True)  # names and shapes exactly fla's
    x = torch.randn(1, 13, 32)
    with torch.no_grad():
        ref = reference_attention(fla, x)
        got, _ = ours(x)
        assert rel_err(got, ref) < 1e-5
        # one token at a time through the cache
        steps, state = [], None
        for t in range(13):
            o, state = ours(x[:, t:t + 1], state=state)
            steps.append(o)
        assert rel_err(torch.cat(steps, 1), ref) < 1e-5
        assert state.position.tolist() == [13]
        assert state.key.shape[2] == (spec.get("window_size") or 13)


HYBRID = dict(vocab_size=61, hidden_size=32, num_hidden_layers=4, num_heads=2, use_short_conv=True,
              attn=[dict(layers=[1], num_heads=4, num_kv_heads=2, qkv_bias=True),
                    dict(layers=[3], num_heads=2, window_size=4)])


@pytest.fixture(scope="module")
def fla_hybrid_checkpoint(tmp_path_factory):
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    path = tmp_path_factory.mktemp("fla-hybrid")
    return path, save_fla_checkpoint(HYBRID, path)


def test_fla_hybrid_checkpoint_loads_unchanged(fla_hybrid_checkpoint):
    path, fla_sd = fla_hybrid_checkpoint
    ours = load_model(path)
    assert ours.config.attention_layers == [1, 3]
    assert isinstance(ours.model.layers[1].attn, Attention) and isinstance(ours.model.layers[3].attn, Attention)
    sd = ours.state_dict()
    assert set(sd) == set(fla_sd)
    for k, v in fla_sd.items():
        assert torch.equal(sd[k], v), k


def _model(**over) -> GLAForCausalLM:
    torch.manual_seed(1)
    m = GLAForCausalLM(GLAConfig(**{**HYBRID, **over})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return m


def test_incremental_decode_matches_full_forward():
    m = _model()
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        full = m(ids)
        out = m(ids[:, :6])
        logits, states = [out.logits], out.states
        out = m(ids[:, 6:9], states=states)  # a second prefill chunk over a non-empty cache
        logits.append(out.logits)
        states = out.states
        for t in range(9, 17):
            out = m(ids[:, t:t + 1], states=states)
            logits.append(out.logits)
            states = out.states
    assert rel_err(torch.cat(logits, 1), full.logits) < 1e-5
    assert states[1].key.shape == (2, 2, 17, 8) and states[3].key.shape == (2, 2, 4, 16)
    for a, b in zip(states, full.states):
        for f in ("recurrent", "conv", "key", "value", "position"):
            if getattr(a, f) is not None:
                assert rel_err(getattr(a, f).double(), getattr(b, f).double()) < 1e-5, f


def test_left_padded_rows_match_rows_alone_with_and_without_past():
    m = _model()
    lens = [9, 4]
    ids = torch.randint(0, 61, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.long)
    for r, n in enumerate(lens):
        mask[r, 9 - n:] = 1
    with torch.no_grad():
        past = m(torch.randint(0, 61, (2, 5))).states
        for states in (None, past):
            out = m(ids, attention_mask=mask, states=states)
            for r, n in enumerate(lens):
                row_states = None if states is None else [_row(s, r) for s in states]
                alone = m(ids[r:r + 1, 9 - n:], states=row_states)
                assert rel_err(out.logits[r, 9 - n:], alone.logits[0]) < 1e-5
                for a, b in zip(out.states, alone.states):
                    if a.key is not None:
                        n_keep = b.key.shape[2]  # the padded row's full cache has padding slots in front
                        assert rel_err(a.key[r, :, -n_keep:], b.key[0]) < 1e-5
                        assert a.position[r] == b.position[0]
                    else:
                        assert rel_err(a.recurrent[r], b.recurrent[0]) < 1e-5


def _row(s, r):
    from gla_export.models import LayerState

    return LayerState(*(None if t is None else t[r:r + 1] for t in (s.recurrent, s.conv, s.key, s.value, s.position)))


@pytest.mark.parametrize("attn, field", [
    (dict(layers=[5], num_heads=2), "layers"),
    (dict(layers=[0], num_heads=3), "num_heads"),
    (dict(layers=[0], num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(layers=[0], num_heads=2, window_size=0), "window_size"),
    ([dict(layers=[0], num_heads=2), dict(layers=[0], num_heads=2)], "layers"),
])
def test_bad_attention_spec_names_the_field(attn, field):
    with pytest.raises(ConfigError, match=field):
        GLAConfig(vocab_size=10, hidden_size=32, num_hidden_layers=2, num_heads=2, attn=attn)


def test_builder_takes_an_attention_spec():
    from gla_export.models import attention_spec, build_model, count_parameters, make_config, state_shapes

    spec = [attention_spec([1], num_heads=4, num_kv_heads=2), attention_spec([2], num_heads=2, window_size=8, qkv_bias=True)]
    cfg = make_config(vocab_size=50, embed_dim=32, num_layers=3, num_heads=2, attn=spec)
    assert cfg.attention_layers == [1, 2]
    model = build_model(vocab_size=50, embed_dim=32, num_layers=3, num_heads=2, attn=spec)
    assert isinstance(model.model.layers[2].attn, Attention) and model.model.layers[2].attn.q_proj.bias is not None
    assert count_parameters(cfg) == count_parameters(model)
    assert state_shapes(cfg, 2, layer=1, context=10)["key"] == (2, 2, 10, 8)
    assert state_shapes(cfg, 2, layer=2, context=10)["value"] == (2, 2, 8, 16)
    assert "recurrent_state" in state_shapes(cfg, 2, layer=0)
    with torch.no_grad():
        st = model(torch.randint(0, 50, (2, 10))).states
    assert tuple(st[1].key.shape) == state_shapes(cfg, 2, layer=1, context=10)["key"]
    assert tuple(st[2].key.shape) == state_shapes(cfg, 2, layer=2, context=10)["key"]
