"""On a GPU: our model's logits vs flash-linear-attention's own forward on the same weights.

Both are compared with our model in float64 on the CPU (the chunked op, which equals the naive
reference to 1e-15): fla's chunk_gla uses TF32 products in float32, so ours and fla's are each
measured against the float64 truth rather than against each other. The numbers are printed for
docs/benchmarks.md.
"""

import warnings

import pytest
import torch

from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.testing import rel_err

pytestmark = pytest.mark.gpu

CONFIGS = {
    "sample-like": dict(vocab_size=258, hidden_size=256, num_hidden_layers=4, num_heads=4, tie_word_embeddings=True),
    "gqa-conv": dict(vocab_size=300, hidden_size=256, num_hidden_layers=3, num_heads=4, num_kv_heads=2, use_short_conv=True),
    "1.3B-heads": dict(vocab_size=300, hidden_size=1024, num_hidden_layers=2, num_heads=2, expand_k=0.5, expand_v=1.0),
}


def _fla_model(kwargs):
    pytest.importorskip("fla")
    warnings.filterwarnings("ignore")
    from fla.models import GLAConfig as FlaConfig
    from fla.models import GLAForCausalLM as FlaModel

    return FlaModel(FlaConfig(**kwargs))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("T", [64, 1000])
def test_logits_match_fla_forward(name, T):
    kwargs = CONFIGS[name]
    fla_model = _fla_model(kwargs)
    # our initialisation, then the same weights into fla's model
    ours = GLAForCausalLM(GLAConfig(**kwargs))
    with torch.no_grad():  # gates nearer to real models: not all decay at the start
        for layer in ours.model.layers:
            layer.attn.gk_proj[1].bias.uniform_(-2.0, 4.0)
    fla_model.load_state_dict(ours.state_dict())
    ids = torch.randint(0, kwargs["vocab_size"], (2, T))

    truth = ours.double().eval()
    with torch.no_grad():
        ref = truth(ids, gla_backend="chunk").logits
    ours = ours.float().cuda().eval()
    fla_model = fla_model.float().cuda().eval()
    with torch.no_grad():
        got_ours = ours(ids.cuda()).logits  # auto: the Triton backend on CUDA
        got_fla = fla_model(ids.cuda()).logits.float()
    e_ours, e_fla, e_between = rel_err(got_ours, ref), rel_err(got_fla, ref), rel_err(got_ours, got_fla)
    print(f"\nPARITY {name} T={T}: ours vs float64 {e_ours:.2e}, fla vs float64 {e_fla:.2e}, ours vs fla {e_between:.2e}")
    assert e_ours < 1e-4, e_ours
    assert e_fla < 1e-2, e_fla  # fla's TF32 path, measured ~1e-3 on whole models (DESIGN.md §6)
    assert e_between < 1e-2


@pytest.mark.parametrize("name", ["sample-like", "gqa-conv"])
def test_bf16_logits_match_fla(name):
    kwargs = CONFIGS[name]
    fla_model = _fla_model(kwargs)
    ours = GLAForCausalLM(GLAConfig(**kwargs))
    fla_model.load_state_dict(ours.state_dict())
    ids = torch.randint(0, kwargs["vocab_size"], (2, 300))
    with torch.no_grad():
        ref = ours.double().eval()(ids, gla_backend="chunk").logits
        got_ours = ours.to(torch.bfloat16).cuda().eval()(ids.cuda()).logits
        got_fla = fla_model.to(torch.bfloat16).cuda().eval()(ids.cuda()).logits
    e_ours, e_fla = rel_err(got_ours, ref), rel_err(got_fla, ref)
    print(f"\nPARITY bf16 {name}: ours vs float64 {e_ours:.2e}, fla vs float64 {e_fla:.2e}")
    assert e_ours < 5e-2 and e_fla < 5e-2


HYBRID_CONFIGS = {
    "hybrid-full-and-window": dict(vocab_size=300, hidden_size=256, num_hidden_layers=4, num_heads=4, use_short_conv=True,
                                   attn=[dict(layers=[1], num_heads=8, num_kv_heads=2, qkv_bias=True),
                                         dict(layers=[3], num_heads=4, window_size=64)]),
}


@pytest.mark.parametrize("name", HYBRID_CONFIGS)
@pytest.mark.parametrize("T", [64, 300])
def test_hybrid_logits_match_fla_forward(name, T):
    """Hybrid (softmax-attention layers): fla's Attention runs flash-attn, which takes only fp16/bf16,
    so fla runs in bf16 and both are measured against our model in float64 on the CPU."""
    pytest.importorskip("flash_attn", reason="fla's Attention layer needs flash-attn")
    kwargs = HYBRID_CONFIGS[name]
    fla_model = _fla_model(kwargs)
    ours = GLAForCausalLM(GLAConfig(**kwargs))
    with torch.no_grad():
        for layer in ours.model.layers:
            if hasattr(layer.attn, "gk_proj"):
                layer.attn.gk_proj[1].bias.uniform_(-2.0, 4.0)
    fla_model.load_state_dict(ours.state_dict())
    ids = torch.randint(0, kwargs["vocab_size"], (2, T))
    with torch.no_grad():
        ref = ours.double().eval()(ids, gla_backend="chunk").logits
        got_ours = ours.float().cuda().eval()(ids.cuda()).logits
        got_fla = fla_model.bfloat16().cuda().eval()(ids.cuda()).logits.float()
    e_ours, e_fla = rel_err(got_ours, ref), rel_err(got_fla, ref)
    print(f"\nPARITY {name} T={T}: ours (fp32) vs float64 {e_ours:.2e}, fla (bf16) vs float64 {e_fla:.2e}")
    assert e_ours < 1e-4, e_ours
    assert e_fla < 5e-2, e_fla  # bf16 activations over a whole model
