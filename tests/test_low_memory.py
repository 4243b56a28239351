"""Low-memory inference: bf16 and weight-only int8 weights load, generate, and stay close to fp32."""

import copy
import shutil

import pytest
import torch

import tessera
from tessera.config import to_dict
from tessera.model.api import Tessera, random_model, resolve_dtype
from tessera.model.quant import Int8Linear, quantize_int8
from tessera.model.transformer import Transformer, model_preset
from tessera.storage import atomic_write_json, save_tensors
from tessera.tokenizers import VocabLayout, build_bundle
from tessera.tokenizers.bundle import read_bundle_spec

# Tolerances, relative L2 error of the logits against fp32 (a trained demo model: see docs/generation.md for
# what they cost in held-out loss).
INT8_TOL = 0.02
BF16_TOL = 0.03


def fake_run(d, text_dir, preset="tiny", seed=0, bundle=None, **overrides):
    """A run directory as training writes it, with a random model's weights (over a text-only bundle, or a
    copy of `bundle`)."""
    if bundle is None:
        build_bundle(d / "tokenizer", text_dir)
    else:
        shutil.copytree(bundle, d / "tokenizer")
    spec = read_bundle_spec(d / "tokenizer")
    mcfg = model_preset(preset)
    for k, v in overrides.items():
        setattr(mcfg, k, v)
    mcfg.vocab_size = VocabLayout.from_dict(spec["layout"]).padded_vocab_size
    atomic_write_json(d / "config.json", {"format": "tessera-run", "version": 1, "model": to_dict(mcfg),
                                          "tokenizer_hash": spec["hash"], "layout": spec["layout"]})
    t = Transformer(mcfg)
    t.init_weights(seed=seed)
    save_tensors(d / "model.safetensors", t.state_dict())
    return d


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.fixture(scope="module")
def m(fixture_tokenizer):
    return random_model(fixture_tokenizer, "tiny", seed=0)


def test_int8_weights_are_per_channel_symmetric_and_close():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = Int8Linear(lin)
    assert q.weight_int8.dtype == torch.int8 and q.scale.shape == (48,)
    assert q.weight_int8.abs().amax(1).eq(127).all()  # each row's largest weight maps to +-127
    assert (q.dequantized() - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-7  # half a step at most
    x = torch.randn(3, 5, 64)
    assert rel(q(x), lin(x)) < 0.01


def test_bf16_and_int8_models_stay_close_to_fp32_and_generate(m):
    ids = torch.tensor([m.tokenizer.encode(["a drawing of the digit seven"], bos=True)])
    with torch.no_grad():
        ref = m.model(ids)
    for name, tol in (("bf16", BF16_TOL), ("int8", INT8_TOL)):
        model = copy.deepcopy(m.model)
        if name == "bf16":
            model.to(torch.bfloat16)
        else:
            quantize_int8(model)
            assert sum(isinstance(x, Int8Linear) for x in model.modules()) == 2 * 4 + 1  # 2 layers x (wqkv, wo, w13, w2) + output
        low = Tessera(model, m.tokenizer)
        with torch.no_grad():
            err = rel(low.model(ids), ref)
        assert err < tol, (name, err)
        for output in ("text", "image", "audio"):
            out = low.generate("seven", output=output, seed=0, max_audio_seconds=0.2)
            assert len(out) >= 1
        if name == "bf16":
            continue
        # greedy decoding with the KV cache agrees with the uncached forward pass of the same weights
        g = low.generate_ids("seven", output="text", temperature=0, max_new_tokens=8)[0]
        with torch.no_grad():
            step = low.model(ids[:, :0].new_tensor([m.tokenizer.encode(["seven"], bos=True)])).float()[0, -1]
        allowed = low.fsm.rows[low.fsm.R_TEXT].clone()
        allowed[low.tokenizer.eos_id] = False
        assert g[0] == int(step.masked_fill(~allowed, float("-inf")).argmax())


def test_load_takes_a_dtype_name_and_a_draft(tmp_path, text_dir, codec_bundle):
    run = fake_run(tmp_path / "run", text_dir, seed=0)
    small = fake_run(tmp_path / "draft", text_dir, seed=1, dim=32, n_heads=2, n_kv_heads=1, n_layers=1)
    ref = tessera.load(run, device="cpu")
    ids = torch.tensor([ref.tokenizer.encode(["hello"], bos=True)])
    for name in ("bf16", "int8"):
        low = tessera.load(run, device="cpu", dtype=name, draft=small, draft_tokens=3)
        assert (next(low.model.parameters()).dtype == torch.bfloat16) == (name == "bf16")
        assert any(isinstance(x, Int8Linear) for x in low.model.modules()) == (name == "int8")
        with torch.no_grad():
            assert rel(low.model(ids), ref.model(ids)) < max(INT8_TOL, BF16_TOL)
        assert low.draft is not None and low.draft_tokens == 3
        assert low.draft.model.tok_embeddings.weight.dtype == next(low.model.parameters()).dtype
        a = low.generate_ids("hello", output="text", temperature=0, max_new_tokens=12)
        assert low.last_speculation["rounds"] >= 1
        assert a == low.generate_ids("hello", output="text", temperature=0, max_new_tokens=12, draft=False)
    other = fake_run(tmp_path / "other", text_dir, seed=2, bundle=codec_bundle)
    with pytest.raises(ValueError, match="share the bundle"):
        tessera.load(run, device="cpu", draft=other)
    assert tessera.load(run, device="cpu", draft="jacobi").draft == "jacobi"
    with pytest.raises(ValueError, match="spelled lookup or jacobi"):  # not "config.json is missing"
        tessera.load(run, device="cpu", draft="Jacobi")
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int4", torch.device("cpu"))
