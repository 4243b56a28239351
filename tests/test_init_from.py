"""--init-from: starting pretraining from a tessera run or a local Hugging Face Llama, Qwen2 or Qwen3 model."""

import json
import random
import types

import pytest
import torch
from fixtures import hf_model, torchrun_argv

from tessera.model.transformer import Transformer
from tessera.runtime.monitor import read_metrics
from tessera.storage import load_tensors, save_tensors
from tessera.tokenizers import build_bundle
from tessera.tokenizers.bundle import read_bundle_spec
from tessera.tokenizers.layout import VocabLayout
from tessera.train import init_from, pretrain
from tessera.train.pretokenize import PretokenizeConfig, pretokenize

WORDS = ["seven", "eight", "digit", "a", "the", "drawing", "of", "is", "what", "this"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, text_dir):
    """A text-only bundle (the codec bundle's specials: max_grid 16) and shards."""
    d = tmp_path_factory.mktemp("initfrom")
    rng = random.Random(0)
    docs = [{"segments": [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20)))}]} for _ in range(120)]
    (d / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    build_bundle(d / "bundle", text_dir, max_grid=16)
    pretokenize(d / "bundle", [d / "docs.jsonl"], d / "shards", PretokenizeConfig(workers=1), progress=False)
    return d


def text_size(bundle):
    return VocabLayout.from_dict(read_bundle_spec(bundle)["layout"]).text_size


def imported(path, bundle, **train):
    """Plan and build the decoder --init-from PATH would start from."""
    tcfg = pretrain.TrainConfig(**train)
    mcfg, record = init_from.plan(path, read_bundle_spec(bundle), tcfg, None, [])
    model = Transformer(mcfg)
    model.init_weights(seed=0)
    init_from.initialize(model, record, bundle, tcfg)
    return model.eval(), record


def args(corpus, out, *extra):
    return ["--tokenizer", str(corpus / "bundle"), "--data", str(corpus / "shards"), "--out", str(out),
            "--set", "seq_len=64", "--set", "batch_size=2", "--set", "log_every=1", "--set", "warmup_steps=2",
            "--set", "dtype=fp32", "--device", "cpu", *extra]


@pytest.mark.parametrize("kind,tie,shard", [("llama", False, False), ("qwen2", False, True), ("qwen3", True, True)])
def test_an_hf_model_imports_with_the_same_logits(corpus, tmp_path, kind, tie, shard):
    from tessera.model.hf_export import to_hf_model

    n = text_size(corpus / "bundle")
    hf = hf_model(kind, tmp_path / "hf", n, tie=tie, shard=shard)
    assert shard == (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model, record = imported(tmp_path / "hf", corpus / "bundle")
    cfg = model.cfg
    assert (cfg.qk_norm, cfg.attn_bias, cfg.tie_embeddings) == (kind == "qwen3", kind == "qwen2", tie)
    assert (cfg.dim, cfg.n_layers, cfg.kv_heads, cfg.hidden_dim, cfg.rope_theta) == (64, 2, 2, 96, 50000.0)
    assert record["rows"] == [[0, 0, n]] and record["architecture"] == type(hf).__name__
    assert cfg.vocab_size == VocabLayout.from_dict(read_bundle_spec(corpus / "bundle")["layout"]).padded_vocab_size
    ids = torch.randint(0, n, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours[..., :n] - theirs).abs().max() <= 1e-5
    # new rows: drawn from the copied rows' per-dimension mean and spread
    emb = model.tok_embeddings.weight.detach()
    old, new = emb[:n], emb[n:]
    assert (new.mean(0) - old.mean(0)).abs().max() < 4 * old.std(0).max() / len(new) ** 0.5
    assert 0.8 < new.std(0).mean() / old.std(0).mean() < 1.2
    if kind == "qwen2":  # and the biases survive the export back to transformers
        back = to_hf_model(model)
        assert type(back).__name__ == "Qwen2ForCausalLM"
        with torch.no_grad():
            assert (back(ids).logits[..., :n] - theirs).abs().max() <= 1e-5


def test_pretraining_from_an_hf_model_starts_at_its_logits_records_the_source_and_resumes(corpus, tmp_path):
    import tessera

    n = text_size(corpus / "bundle")
    hf = hf_model("llama", tmp_path / "hf", n)
    start = tmp_path / "start"
    assert pretrain.main(args(corpus, start, "--init-from", str(tmp_path / "hf"), "--max-steps", "0")) == 0
    cfg = json.loads((start / "config.json").read_text())
    assert cfg["init_from"]["path"] == str((tmp_path / "hf").resolve())
    assert cfg["init_from"]["architecture"] == "LlamaForCausalLM" and cfg["model"]["dim"] == 64
    m = tessera.load(start, device="cpu", dtype=torch.float32)
    ids = torch.tensor([m.tokenizer.encode(["the digit seven"], bos=True)])
    with torch.no_grad():
        assert (m.model(ids)[..., :n] - hf(ids).logits).abs().max() <= 1e-5

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert pretrain.main(args(corpus, straight, "--init-from", str(tmp_path / "hf"), "--max-steps", "6")) == 0
    assert pretrain.main(args(corpus, split, "--init-from", str(tmp_path / "hf"), "--set", "steps=6",
                              "--max-steps", "3")) == 0
    assert pretrain.main(args(corpus, split, "--init-from", str(tmp_path / "hf"), "--resume")) == 2  # exclusive
    assert pretrain.main(args(corpus, split, "--resume", "--max-steps", "6")) == 0
    losses = [[(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r] for run in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert json.loads((split / "config.json").read_text())["init_from"] == cfg["init_from"]


def test_a_tessera_run_continues_with_the_same_weights_and_a_grown_vocabulary(corpus, codec_bundle, tmp_path):
    run = tmp_path / "run"
    assert pretrain.main(args(corpus, run, "--preset", "tiny", "--max-steps", "2")) == 0
    saved = load_tensors(run / "model.safetensors")
    same, record = imported(run, corpus / "bundle")
    assert record["new_rows"] == same.cfg.vocab_size - VocabLayout.from_dict(
        read_bundle_spec(corpus / "bundle")["layout"]).vocab_size
    sd, vocab = same.state_dict(), same.cfg.vocab_size - record["new_rows"]
    assert record["rows"] == [[0, 0, vocab]]
    assert all(torch.equal(sd[k][:vocab] if "embeddings" in k or "output" in k else sd[k], v[:vocab] if
                           "embeddings" in k or "output" in k else v) for k, v in saved.items())
    # the codec bundle adds image and audio codes after the same text and special tokens
    grown, record = imported(run, codec_bundle)
    layout = VocabLayout.from_dict(read_bundle_spec(codec_bundle)["layout"])
    kept = layout.ranges["image"].offset
    assert record["rows"] == [[0, 0, layout.text_size], [layout.text_size, layout.text_size, layout.n_special]]
    for name in ("tok_embeddings.weight", "output.weight"):
        assert torch.equal(grown.state_dict()[name][:kept], saved[name][:kept])
    assert all(torch.equal(grown.state_dict()[k], saved[k]) for k in ("layers.1.attention.wqkv.weight", "norm.weight"))
    # image code rows follow the codec's geometry (init_code_embeddings), at the copied rows' scale
    from tessera.tokenizers import load_bundle

    r = layout.ranges["image"]
    rows = grown.tok_embeddings.weight.detach()[r.offset:r.end]
    v = load_bundle(codec_bundle).image_codec.code_vectors()[0].float()
    v = (v - v.mean(0)) / (v.std(0) + 1e-6)
    idx = torch.randperm(len(v), generator=torch.Generator().manual_seed(0))[:200]
    assert torch.corrcoef(torch.stack([torch.pdist(v[idx]), torch.pdist(rows[idx])]))[0, 1] > 0.5
    assert 0.5 < rows.std(0).mean() / saved["tok_embeddings.weight"][:kept].std(0).mean() < 2
    # but it does not shrink, and the architecture stays the source's
    grown_run = tmp_path / "grown"
    grown_run.mkdir()
    pretrain.write_run_files(grown_run, grown.cfg, pretrain.TrainConfig(), read_bundle_spec(codec_bundle),
                             types.SimpleNamespace(tokenizer=str(codec_bundle), data=str(corpus / "shards"), eval_data=None))
    save_tensors(grown_run / "model.safetensors", grown.state_dict(), metadata={"format": "pt"})
    with pytest.raises(init_from.InitFromError, match="no image codec.*may grow, not shrink"):
        init_from.plan(grown_run, read_bundle_spec(corpus / "bundle"), pretrain.TrainConfig(), None, [])
    with pytest.raises(init_from.InitFromError, match=r"n_layers 3 \(the --set\) vs 2 \(the source\)"):
        init_from.plan(run, read_bundle_spec(corpus / "bundle"), pretrain.TrainConfig(), None, ["n_layers=3"])
    with pytest.raises(init_from.InitFromError, match="Leave out --preset"):
        init_from.plan(run, read_bundle_spec(corpus / "bundle"), pretrain.TrainConfig(), "demo", [])
    mcfg, _ = init_from.plan(run, read_bundle_spec(corpus / "bundle"), pretrain.TrainConfig(), "tiny",
                             ["dropout=0.1", "max_seq_len=128"])
    assert (mcfg.dropout, mcfg.max_seq_len, mcfg.n_layers) == (0.1, 128, 2)


def config_only(tmp_path, **changes):
    """An HF directory with a config.json (and a stand-in weights file): enough for the refusals."""
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 400, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**base, **changes}))
    (d / "model.safetensors").write_bytes(b"")
    return d


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type 'mistral'"),
    ({"architectures": ["LlamaModel"]}, "only LlamaForCausalLM"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE type is 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "RoPE type is 'yarn'"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ({"head_dim": 32}, "head_dim is 32"),
    ({"attention_bias": True}, "attention_bias is on"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
])
def test_an_hf_model_that_does_not_fit_is_refused_saying_what_differs(corpus, tmp_path, changes, message):
    with pytest.raises(init_from.InitFromError, match=message):
        init_from.plan(config_only(tmp_path, **changes), read_bundle_spec(corpus / "bundle"), pretrain.TrainConfig(),
                       None, [])


def test_pickles_missing_or_extra_weights_and_a_different_vocabulary_are_refused(corpus, tmp_path, capsys):
    d = config_only(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(init_from.InitFromError, match="pytorch_model.bin are pickles"):
        init_from.open_source(d)
    n = text_size(corpus / "bundle")
    hf_model("llama", tmp_path / "extra", n)
    weights = load_tensors(tmp_path / "extra" / "model.safetensors")
    save_tensors(tmp_path / "extra" / "model.safetensors", {**weights, "model.layers.0.mlp.up_proj.bias": torch.zeros(96)})
    with pytest.raises(init_from.InitFromError, match="no place for: model.layers.0.mlp.up_proj.bias"):
        imported(tmp_path / "extra", corpus / "bundle")
    del weights["model.layers.1.input_layernorm.weight"]
    save_tensors(tmp_path / "extra" / "model.safetensors", weights)
    with pytest.raises(init_from.InitFromError, match="no model.layers.1.input_layernorm.weight"):
        imported(tmp_path / "extra", corpus / "bundle")
    hf_model("llama", tmp_path / "hf", n + 100)
    assert pretrain.main(args(corpus, tmp_path / "run", "--init-from", str(tmp_path / "hf"), "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"vocabulary has {n + 100} ids, but the bundle's text range has {n}" in err
    assert "init_allow_vocab_mismatch=true" in err
    _, record = imported(tmp_path / "hf", corpus / "bundle", init_allow_vocab_mismatch=True)
    assert record["rows"] == [[0, 0, n]]


def test_freeze_needs_a_source_and_cannot_change_on_resume(corpus, tmp_path, capsys):
    assert pretrain.main(args(corpus, tmp_path / "a", "--preset", "tiny", "--set", "freeze=text_rows")) == 2
    assert "needs --init-from" in capsys.readouterr().err
    assert pretrain.main(args(corpus, tmp_path / "b", "--preset", "tiny", "--set", "freeze=rows")) == 2
    assert "freeze must be" in capsys.readouterr().err
    run = tmp_path / "run"
    assert pretrain.main(args(corpus, run, "--preset", "tiny", "--max-steps", "1")) == 0
    # a run continued on its own bundle brings every row: all_but_new_rows would train only padding rows
    assert pretrain.main(args(corpus, tmp_path / "c", "--init-from", str(run), "--set", "freeze=all_but_new_rows",
                              "--max-steps", "1")) == 0
    hf_model("llama", tmp_path / "hf", text_size(corpus / "bundle"))
    staged = tmp_path / "staged"
    assert pretrain.main(args(corpus, staged, "--init-from", str(tmp_path / "hf"), "--set", "freeze=text_rows",
                              "--max-steps", "1")) == 0
    assert pretrain.main(args(corpus, staged, "--resume", "--set", "freeze=", "--max-steps", "2")) == 2
    assert "freeze cannot change on --resume" in capsys.readouterr().err
    assert pretrain.main(args(corpus, staged, "--resume", "--max-steps", "2")) == 0


@pytest.mark.parametrize("freeze", ["text_rows", "all_but_new_rows"])
def test_frozen_weights_stay_bit_identical_while_new_rows_train(corpus, tmp_path, freeze):
    """A few optimizer steps with weight decay on ids that include new rows: the frozen rows (and, for
    all_but_new_rows, every other weight) are bit-identical, the new rows and the trained weights moved."""
    n = text_size(corpus / "bundle")
    hf_model("llama", tmp_path / "hf", n)
    tcfg = pretrain.TrainConfig(freeze=freeze, weight_decay=0.5, lr=1e-2)
    mcfg, record = init_from.plan(tmp_path / "hf", read_bundle_spec(corpus / "bundle"), tcfg, None, [])
    layout = VocabLayout.from_dict(read_bundle_spec(corpus / "bundle")["layout"])
    init_from.check(tcfg, record, layout)
    model = Transformer(mcfg)
    model.init_weights(seed=0)
    init_from.initialize(model, record, corpus / "bundle", tcfg)
    init_from.freeze_parameters(model, tcfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = pretrain.build_optimizer(model, tcfg, torch.device("cpu"))
    init_from.freeze_rows(model, optimizer, record, layout, tcfg)
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(mcfg.vocab_size, dtype=torch.bool)
    for _ in range(3):
        ids = torch.randint(0, mcfg.vocab_size, (2, 33), generator=g)
        seen[ids[:, :-1].flatten()] = True
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()

    def moved(name):
        return (after[name] != before[name]).any(dim=1)

    for name in ("tok_embeddings.weight", "output.weight"):
        assert torch.equal(after[name][:n], before[name][:n]), name  # frozen rows: bit-identical
    assert moved("output.weight")[n:].all()  # every new output row trains (the softmax reaches it)
    assert torch.equal(moved("tok_embeddings.weight")[n:], seen[n:])  # a new embedding row trains once read
    body = [k for k in after if k not in ("tok_embeddings.weight", "output.weight")]
    if freeze == "all_but_new_rows":
        assert all(torch.equal(after[k], before[k]) for k in body)
    else:
        assert all(not torch.equal(after[k], before[k]) for k in body if k.endswith("wqkv.weight"))


@pytest.mark.parametrize("kind,freeze", [("llama", "all_but_new_rows"), ("qwen3", "text_rows")])
def test_freeze_in_a_training_run_keeps_the_imported_rows(corpus, tmp_path, kind, freeze):
    """Through the trainer (Qwen3's tied table: one table to keep, saved under both names)."""
    n = text_size(corpus / "bundle")
    hf = hf_model(kind, tmp_path / "hf", n, tie=kind == "qwen3")
    run = tmp_path / "run"
    assert pretrain.main(args(corpus, run, "--init-from", str(tmp_path / "hf"), "--set", f"freeze={freeze}",
                              "--max-steps", "3", "--set", "lr=1e-2")) == 0
    assert json.loads((run / "config.json").read_text())["train"]["freeze"] == freeze
    w = load_tensors(run / "model.safetensors")
    assert torch.equal(w["tok_embeddings.weight"][:n], hf.model.embed_tokens.weight.detach())
    assert torch.equal(w["output.weight"][:n], hf.lm_head.weight.detach())
    body = torch.equal(w["layers.0.feed_forward.w2.weight"], hf.model.layers[0].mlp.down_proj.weight.detach())
    assert body == (freeze == "all_but_new_rows")
    start, _ = imported(tmp_path / "hf", corpus / "bundle")
    assert not torch.equal(w["output.weight"][n:], start.output.weight.detach()[n:])  # the new rows trained


def test_a_frozen_stage_under_ddp_matches_one_process(corpus, tmp_path):
    """all_but_new_rows stops most weights from training before DDP wraps the model: two processes train the
    same as one."""
    import os
    import subprocess

    hf_model("llama", tmp_path / "hf", text_size(corpus / "bundle"))
    stage = ("--init-from", str(tmp_path / "hf"), "--set", "freeze=all_but_new_rows", "--max-steps", "3")
    assert pretrain.main(args(corpus, tmp_path / "one", *stage, "--set", "batch_size=4")) == 0
    cmd = [*torchrun_argv(2),
           "-m", "tessera.train.pretrain", *args(corpus, tmp_path / "two", *stage)]
    r = subprocess.run(cmd, check=False, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([(x["step"], x["loss"]) for x in read_metrics(tmp_path / run) if "loss" in x] for run in ("one", "two"))
    assert len(two) == 3 and all(s1 == s2 and a == pytest.approx(b, rel=1e-5) for (s1, a), (s2, b) in zip(one, two))
    a, b = load_tensors(tmp_path / "one" / "model.safetensors"), load_tensors(tmp_path / "two" / "model.safetensors")
    assert torch.equal(a["layers.1.attention.wqkv.weight"], b["layers.1.attention.wqkv.weight"])
