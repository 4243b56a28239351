"""The decoder: attention backends, document masking, RoPE restarts, HF parity of the architecture."""

import pytest
import torch

from tessera.model.attention import attention, document_causal_mask, flash_attn_available
from tessera.model.transformer import ModelConfig, Transformer, model_preset

torch.manual_seed(0)


def rand_qkv(B=2, Hq=4, Hk=2, T=40, D=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, T, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hk, T, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hk, T, D, generator=g).to(device, dtype)
    doc = torch.tensor([[0] * 10 + [1] * 25 + [2] * 5, [0] * 40])[:B].to(device)
    return q, k, v, doc


def reference_attention(q, k, v, doc):
    """Plain softmax attention, one head at a time, with the document-causal mask."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~document_causal_mask(doc), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backends_agree_with_reference(backend):
    q, k, v, doc = rand_qkv()
    ref = reference_attention(q, k, v, doc)
    out = attention(q, k, v, doc_ids=doc, backend=backend)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_sdpa_causal_path_equals_single_document_mask():
    q, k, v, _ = rand_qkv()
    zeros = torch.zeros(2, 40, dtype=torch.long)
    assert torch.allclose(attention(q, k, v), attention(q, k, v, doc_ids=zeros, backend="flex"), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="needs CUDA and flash-attn")
def test_flash_agrees_with_sdpa_on_cuda():
    q, k, v, doc = rand_qkv(dtype=torch.bfloat16, device="cuda")
    a = attention(q, k, v, doc_ids=doc, backend="flash").float()
    b = attention(q, k, v, doc_ids=doc, backend="sdpa").float()
    assert torch.allclose(a, b, atol=2e-2), (a - b).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_compiled_agrees_with_sdpa_on_cuda():
    q, k, v, doc = rand_qkv(device="cuda")
    a = attention(q, k, v, doc_ids=doc, backend="flex")
    b = attention(q, k, v, doc_ids=doc, backend="sdpa")
    assert torch.allclose(a, b, atol=1e-3)


def tiny(**kw):
    cfg = model_preset("tiny")
    cfg.vocab_size = 256
    for k, v in kw.items():
        setattr(cfg, k, v)
    return Transformer(cfg).eval()


def test_packed_row_equals_separate_documents():
    """Document masks + restarting positions: a packed row computes exactly what separate rows compute."""
    m = tiny()
    a, b, c = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 5))
    packed = torch.cat([a, b, c], 1)
    doc = torch.tensor([[0] * 7 + [1] * 12 + [2] * 5])
    pos = torch.cat([torch.arange(7), torch.arange(12), torch.arange(5)])[None]
    with torch.no_grad():
        out = m(packed, pos, doc)
        sep = torch.cat([m(a), m(b), m(c)], 1)
    assert torch.allclose(out, sep, atol=1e-5)


def test_no_token_attends_across_documents():
    """Changing one document's tokens changes no other document's outputs (the attention pattern)."""
    m = tiny()
    x = torch.randint(0, 256, (1, 30))
    doc = torch.tensor([[0] * 10 + [1] * 10 + [2] * 10])
    pos = (torch.arange(30) % 10)[None]
    y = x.clone()
    y[0, 10:20] = (y[0, 10:20] + 1) % 256
    with torch.no_grad():
        ox, oy = m(x, pos, doc), m(y, pos, doc)
    assert torch.equal(ox[0, :10], oy[0, :10]) and torch.equal(ox[0, 20:], oy[0, 20:])
    assert not torch.allclose(ox[0, 10:20], oy[0, 10:20])
    # and within a document attention is causal: a later token does not change earlier outputs
    z = x.clone()
    z[0, 25] = (z[0, 25] + 1) % 256
    with torch.no_grad():
        oz = m(z, pos, doc)
    assert torch.equal(ox[0, :25], oz[0, :25]) and not torch.allclose(ox[0, 25:], oz[0, 25:])


@pytest.mark.parametrize("qk_norm,tie", [(True, False), (False, True)])
def test_hf_parity(qk_norm, tie):
    from tessera.model.hf_export import to_hf_model

    m = tiny(qk_norm=qk_norm, tie_embeddings=tie)
    with torch.no_grad():  # non-trivial norm weights
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf = to_hf_model(m)
    x = torch.randint(0, 256, (3, 33))
    with torch.no_grad():
        assert (m(x) - hf(x).logits).abs().max() <= 1e-4
    arch = type(hf).__name__
    assert arch == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")


def test_presets_and_validation():
    assert model_preset("small").dim == 768
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(model_preset("tiny"))
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(Exception, match="unknown model preset"):
        model_preset("huge")


def test_derived_sizes_follow_overrides():
    """An override of `dim` derives the SwiGLU width from the new dim, not the preset's."""
    from tessera.config import apply_overrides, from_dict, to_dict
    from tessera.model.transformer import Transformer, model_preset

    cfg = apply_overrides(model_preset("demo"), ["dim=128"])
    assert cfg.hidden_dim == 64 * -(-8 * 128 // 3 // 64) == 384 and cfg.kv_heads == 2
    cfg.vocab_size = 256
    m = Transformer(from_dict(type(cfg), to_dict(cfg)))
    assert m.layers[0].feed_forward.w2.weight.shape == (128, 384)
    assert apply_overrides(model_preset("1b"), ["dim=1024"]).hidden_dim == 8192  # an explicit ffn_dim stays
    assert apply_overrides(model_preset("demo"), ["n_kv_heads=0"]).kv_heads == 4


def test_layer_ids_are_fixed_at_construction_and_the_rotary_table_is_not_state():
    m = tiny()
    assert [(b.layer_id, b.attention.layer_id) for b in m.layers] == [(0, 0), (1, 1)]
    assert m.rope.shape == (2, m.cfg.max_seq_len, m.cfg.head_dim) and m.rope.dtype == torch.float32
    assert not any("rope" in k for k in m.state_dict())  # checkpoints keep their keys
    with pytest.raises(ValueError, match="exceed the model's rotary table"):
        m(torch.zeros(1, m.cfg.max_seq_len + 1, dtype=torch.long))


def test_a_meta_built_model_rebuilds_its_rotary_table():
    """FSDP2's path: built on the meta device, materialized with `to_empty` (the table is garbage then), the
    table rebuilt with `init_rope` and the weights loaded: the same outputs as the model it was loaded from."""
    m = tiny()
    with torch.device("meta"):
        e = Transformer(m.cfg)
    e.to_empty(device="cpu")
    e.init_rope()
    e.load_state_dict(m.state_dict())
    assert torch.equal(e.rope, m.rope)
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(e.eval()(x), m(x))


def test_a_kv_cache_longer_than_max_seq_len_grows_the_table():
    """A draft decoding past its own max_seq_len: the cache's slots extend the table, with the numbers a
    longer model's table holds."""
    from tessera.model.kv_cache import KVCache

    short, long = tiny(max_seq_len=16), tiny(max_seq_len=32)
    long.load_state_dict(short.state_dict())
    x = torch.randint(0, 256, (1, 24))
    cache = KVCache.for_model(short, 1, 24)
    assert short.rope.shape[1] == 24 and torch.allclose(short.rope, long.rope[:, :24], rtol=0, atol=1e-6)
    cache.begin(24)
    with torch.no_grad():
        cached = short(x, torch.arange(24)[None], cache=cache)
        assert torch.allclose(cached, long(x), atol=1e-5)


def test_an_unknown_attention_backend_is_a_config_error():
    from tessera.model.attention import BACKENDS

    assert list(BACKENDS) == ["sdpa", "flex", "flash"] and all(callable(f) for f in BACKENDS.values())
    with pytest.raises(ValueError, match="attn_backend must be one of sdpa, flex, flash, got 'flsh'"):
        ModelConfig(attn_backend="flsh")
