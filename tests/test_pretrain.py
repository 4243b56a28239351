"""The trainer: run directory, per-modality logging, exact resume, DDP equivalence, NaN handling, time budgets."""

import json
import os
import subprocess
import time
import types

import pytest
import torch
from fixtures import run_torchrun, torchrun_argv

from tessera.runtime import monitor, schedule
from tessera.runtime.monitor import Progress, read_metrics
from tessera.tokenizers import build_bundle
from tessera.train import init_from, pretrain
from tessera.train.pretokenize import PretokenizeConfig, pretokenize

WORDS = ["seven", "eight", "digit", "a", "the", "drawing", "of", "is", "what", "this"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, text_dir):
    import random

    d = tmp_path_factory.mktemp("pre")
    rng = random.Random(0)
    with open(d / "docs.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"segments": [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))}],
                                "source": rng.choice(["a", "b"])}) + "\n")
    build_bundle(d / "bundle", text_dir)
    pretokenize(d / "bundle", [d / "docs.jsonl"], d / "shards", PretokenizeConfig(workers=1, docs_per_shard=100),
                progress=False)
    return d


def args(corpus, out, *extra):
    return ["--preset", "tiny", "--tokenizer", str(corpus / "bundle"), "--data", str(corpus / "shards"),
            "--out", str(out), "--set", "seq_len=64", "--set", "batch_size=2", "--set", "log_every=1",
            "--set", "warmup_steps=2", "--set", "eval_batches=2", "--device", "cpu", *extra]


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r and "nan_skip" not in r]


def test_training_writes_a_run(corpus, tmp_path):
    assert pretrain.main(args(corpus, tmp_path / "run", "--max-steps", "12", "--eval-data", str(corpus / "shards"))) == 0
    run = tmp_path / "run"
    for f in ("config.json", "model.safetensors", "tokenizer/tokenizer.json", "checkpoints/latest", "metrics.jsonl"):
        assert (run / f).exists(), f
    recs = read_metrics(run)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for k in ("loss_text", "lr", "grad_norm", "tokens_per_sec", "mfu", "z_loss"):
        assert k in steps[-1], k
    assert "eval_loss_text" in recs[-1]
    assert steps[-1]["loss"] < steps[0]["loss"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["vocab_size"] % 128 == 0 and cfg["tokenizer_hash"]


def test_keep_best_keeps_the_weights_of_the_lowest_held_out_loss(corpus, tmp_path, monkeypatch, capsys):
    from tessera.storage import load_tensors

    scripted = iter([3.0, 2.0, 2.5, 2.8, 2.9, 3.1, 3.3])  # held-out losses at steps 2, 4, ..., 12, then the end
    real = pretrain.evaluate

    def evaluate(*a, **k):
        r = real(*a, **k)
        return {**r, "eval_loss": next(scripted)}

    monkeypatch.setattr(pretrain, "evaluate", evaluate)
    run = tmp_path / "run"
    assert pretrain.main(args(corpus, run, "--max-steps", "12", "--eval-data", str(corpus / "shards"),
                              "--set", "eval_every=2", "--set", "keep_best=true", "--set", "ckpt_every=4",
                              "--set", "keep_checkpoints=5")) == 0
    assert json.loads((run / "best.json").read_text())["step"] == 4
    kept = load_tensors(run / "model.safetensors")
    assert all((kept[k] == v).all() for k, v in load_tensors(run / "checkpoints/step_000004/model.safetensors").items())
    latest = load_tensors(run / "checkpoints/step_000012/model.safetensors")  # --resume continues from here
    assert any((kept[k] != latest[k]).any() for k in kept)
    assert "holds step 4" in capsys.readouterr().out
    assert pretrain.main(args(corpus, tmp_path / "x", "--max-steps", "2", "--set", "keep_best=true")) == 2


def test_exact_resume(corpus, tmp_path):
    straight = tmp_path / "straight"
    pretrain.main(args(corpus, straight, "--max-steps", "8"))
    split = tmp_path / "split"
    pretrain.main(args(corpus, split, "--set", "steps=8", "--max-steps", "4"))
    assert pretrain.main(args(corpus, split, "--max-steps", "8")) == 2  # refuses to overwrite without --resume
    pretrain.main(args(corpus, split, "--resume", "--max-steps", "8"))
    assert losses(straight) == losses(split)  # bit-identical per-step losses
    assert len(losses(split)) == 8


def test_a_time_budget_alone_sizes_the_schedule_and_ends_the_run(corpus, tmp_path, monkeypatch, capsys):
    """--max-minutes without --max-steps: the run goes on until the time is up, past the default step count;
    the lr schedule and the progress bar are sized to the steps that fit, and the log names the bound.
    A fake clock makes every step take 50 ms, so 3 s fit 60 steps."""
    real, calls, bars = pretrain.token_losses, {"n": 0}, []

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    class Bar(Progress):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(pretrain, "token_losses", counted)
    clock = types.SimpleNamespace(monotonic=lambda: 0.05 * calls["n"], time=time.time, strftime=time.strftime,
                                  gmtime=time.gmtime)
    monkeypatch.setattr(monitor, "time", clock)
    monkeypatch.setattr(schedule, "time", clock)
    monkeypatch.setattr(pretrain, "Progress", Bar)
    monkeypatch.setattr(pretrain, "DEFAULT_STEPS", 20, raising=False)
    run = tmp_path / "timed"
    assert pretrain.main(args(corpus, run, "--max-minutes", "0.05", "--set", "warmup_steps=30")) == 0
    out = capsys.readouterr().out
    recs = [r for r in read_metrics(run) if "loss" in r]
    last = recs[-1]
    assert 59 <= last["step"] <= 61  # past DEFAULT_STEPS: only the time bounds the run
    assert last["lr"] == pytest.approx(3e-3 * 0.1, rel=0.01)  # decayed to its floor as the time ran out
    assert bars[0].bar.total == last["step"] and last["planned_steps"] == last["step"]
    assert recs[9]["lr"] > 0.8 * 3e-3  # warmup capped to a tenth of the planned run, not 30 of 60 steps
    assert "the time limit (0.05 min) ended the run" in out
    # --resume without bounds continues the recorded plan (it is complete: nothing left to do)
    assert pretrain.main(args(corpus, run, "--resume")) == 0
    assert f"stopped at step {last['step']} after" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] == last["step"]


# The equivalence tests pin fp32: they check the arithmetic of splitting a batch, which bf16's rounding (the
# default on CPUs with native bf16) would blur beyond their tolerance.
FP32 = ("--set", "dtype=fp32")


def test_gradient_accumulation_matches_a_larger_batch(corpus, tmp_path):
    pretrain.main(args(corpus, tmp_path / "big", "--max-steps", "4", "--set", "batch_size=4", *FP32))
    pretrain.main(args(corpus, tmp_path / "acc", "--max-steps", "4", "--set", "batch_size=2", "--set", "grad_accum=2",
                       *FP32))
    for (s1, a), (s2, b) in zip(losses(tmp_path / "big"), losses(tmp_path / "acc")):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)


def test_two_processes_under_torchrun_match_one(corpus, tmp_path):
    """DDP over gloo through the real torchrun entry point, same global batch as one process."""
    pretrain.main(args(corpus, tmp_path / "one", "--max-steps", "4", "--set", "batch_size=4", *FP32))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [*torchrun_argv(2),
           "-m", "tessera.train.pretrain", *args(corpus, tmp_path / "two", "--max-steps", "4", "--set", "batch_size=2",
                                                 *FP32)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 4
    for (s1, a), (s2, b) in zip(one, two):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)


def test_nan_steps_are_skipped_then_stop_the_run(corpus, tmp_path, monkeypatch, capsys):
    real = pretrain.token_losses
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        r = real(*a, **k)
        if calls["n"] in (3,) or calls["n"] >= 6:
            r["ce"] = r["ce"] * float("nan")
        return r

    monkeypatch.setattr(pretrain, "token_losses", flaky)
    rc = pretrain.main(args(corpus, tmp_path / "nan", "--max-steps", "20", "--set", "max_nan_skips=3",
                            "--set", "ckpt_every=2"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row" in err and "last good checkpoint (4)" in err
    recs = read_metrics(tmp_path / "nan")
    assert sum(1 for r in recs if r.get("nan_skip")) == 4


def test_mismatched_bundle_is_refused(corpus, tmp_path, text_dir, capsys):
    other = tmp_path / "other"
    build_bundle(other, text_dir, max_grid=8)  # same text, different layout -> different hash
    rc = pretrain.main(["--preset", "tiny", "--tokenizer", str(other), "--data", str(corpus / "shards"),
                        "--out", str(tmp_path / "r")])
    assert rc == 2 and "was tokenized with bundle" in capsys.readouterr().err


def test_unknown_override_is_an_error(corpus, tmp_path, capsys):
    assert pretrain.main(args(corpus, tmp_path / "r", "--set", "lrr=1")) == 2
    assert "no key 'lrr'" in capsys.readouterr().err
    assert pretrain.main(args(corpus, tmp_path / "r", "--set", "model.dimm=1")) == 2
    capsys.readouterr()
    assert pretrain.main(args(corpus, tmp_path / "r", "--set", "dim=64")) == 2  # a model key without its prefix
    assert "write --set model.dim=64" in capsys.readouterr().err


def test_code_embeddings_start_from_the_codecs_code_vectors(codec_bundle):
    import torch

    from tessera.model.transformer import Transformer, model_preset
    from tessera.tokenizers import load_bundle

    tok = load_bundle(codec_bundle)
    cfg = model_preset("tiny")
    cfg.vocab_size = tok.layout.padded_vocab_size
    model = Transformer(cfg)
    model.init_weights(seed=0)
    before = model.tok_embeddings.weight.detach().clone()
    done = init_from.init_code_embeddings(model, codec_bundle)
    assert done == ["image"] + [f"audio.{q}" for q in range(tok.layout.audio_levels)]
    emb = model.tok_embeddings.weight.detach()
    text = tok.layout.ranges["text"]
    assert torch.equal(emb[text.offset:text.end], before[text.offset:text.end])  # text rows untouched
    for name, codec in (("image", tok.image_codec), ("audio.0", tok.audio_codec)):
        r = tok.layout.ranges[name]
        rows = emb[r.offset:r.end]
        assert abs(rows.std().item() - cfg.init_std) < 0.2 * cfg.init_std
        # codes the codec places close together start close together: pairwise distances correlate
        v = codec.code_vectors()[0].float()
        v = (v - v.mean(0)) / (v.std(0) + 1e-6)
        idx = torch.randperm(len(v), generator=torch.Generator().manual_seed(0))[:200]
        dv, de = torch.pdist(v[idx]), torch.pdist(rows[idx].float())
        assert torch.corrcoef(torch.stack([dv, de]))[0, 1] > 0.5


def test_ema_weights_are_evaluated_exported_and_resumed_exactly(corpus, tmp_path):
    import torch

    from tessera.storage import load_tensors

    ema = ("--set", "ema_decay=0.9", "--set", "dtype=fp32")
    straight = tmp_path / "straight"
    assert pretrain.main(args(corpus, straight, "--max-steps", "8", *ema)) == 0
    ck = straight / "checkpoints/step_000008"
    exported, raw, avg = (load_tensors(p) for p in (straight / "model.safetensors", ck / "model.safetensors",
                                                     ck / "ema.safetensors"))
    assert all(torch.equal(exported[k], avg[k]) for k in avg)  # model.safetensors holds the average
    assert any(not torch.equal(raw[k], avg[k]) for k in avg)  # which is not the last step's weights
    # the average lies between the start and the end: closer to the end than the start is
    first = tmp_path / "one"
    pretrain.main(args(corpus, first, "--max-steps", "1", *ema))
    start = load_tensors(first / "checkpoints/step_000001/model.safetensors")
    k = "layers.0.feed_forward.w2.weight"
    assert (avg[k] - raw[k]).norm() < (start[k] - raw[k]).norm()

    split = tmp_path / "split"
    pretrain.main(args(corpus, split, "--set", "steps=8", "--max-steps", "4", *ema))
    pretrain.main(args(corpus, split, "--resume", "--max-steps", "8", *ema))
    resumed = load_tensors(split / "checkpoints/step_000008/ema.safetensors")
    assert all(torch.equal(resumed[k], avg[k]) for k in avg)
    assert losses(straight) == losses(split)


def test_ema_decay_out_of_range_is_refused(corpus, tmp_path, capsys):
    assert pretrain.main(args(corpus, tmp_path / "run", "--max-steps", "2", "--set", "ema_decay=1.0")) == 2
    assert "ema_decay" in capsys.readouterr().err


def _torchrun(corpus, out, *extra):
    run_torchrun(["tessera.train.pretrain", *args(corpus, out, *extra)], timeout=300)


def test_fsdp_starts_from_the_weights_ddp_starts_from_and_trains_alike(corpus, tmp_path):
    """FSDP2 over gloo on CPU, two processes: the same seeded start as DDP (rank 0 builds it and sends each
    rank its shards), so the same per-step losses, and a checkpoint with the same names and values."""
    from tessera.storage import load_tensors

    run = ("--max-steps", "3", "--set", "batch_size=2", "--set", "ckpt_every=3", *FP32)
    _torchrun(corpus, tmp_path / "ddp", *run)
    _torchrun(corpus, tmp_path / "fsdp", "--fsdp", *run)
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert len(fsdp) == 3
    for (s1, a), (s2, b) in zip(ddp, fsdp):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    a = load_tensors(tmp_path / "ddp/checkpoints/step_000003/model.safetensors")
    b = load_tensors(tmp_path / "fsdp/checkpoints/step_000003/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_wrapped_blocks_save_and_load_under_clean_names():
    """Activation checkpointing and compile wrap each block; checkpoints keep the plain model's names."""
    from tessera.model.transformer import Transformer, model_preset
    from tessera.train.parallel import (
        apply_activation_checkpointing,
        apply_compile,
        full_model_state,
        load_full_model_state,
    )

    cfg = model_preset("tiny")
    cfg.vocab_size = 256
    plain = Transformer(cfg)
    plain.init_weights(seed=1)
    wrapped = Transformer(cfg)
    apply_activation_checkpointing(wrapped)
    apply_compile(wrapped)  # compiles lazily, at the first call: nothing is compiled here
    assert any("_orig_mod" in k or "_checkpoint_wrapped_module" in k for k in wrapped.state_dict())
    load_full_model_state(wrapped, plain.state_dict())
    sd = full_model_state(wrapped)
    assert sd.keys() == plain.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())


def test_activation_checkpointing_trains_identically(corpus, tmp_path):
    pretrain.main(args(corpus, tmp_path / "plain", "--max-steps", "3", *FP32))
    pretrain.main(args(corpus, tmp_path / "ac", "--max-steps", "3", "--set", "activation_checkpointing=true", *FP32))
    assert losses(tmp_path / "plain") == losses(tmp_path / "ac")


@pytest.mark.slow
def test_compiled_training_matches_eager(corpus, tmp_path):
    pretrain.main(args(corpus, tmp_path / "eager", "--max-steps", "3", *FP32))
    pretrain.main(args(corpus, tmp_path / "compiled", "--max-steps", "3", "--compile", *FP32))
    for (s1, a), (s2, b) in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled")):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4)


def test_compile_auto_compiles_runs_long_enough_to_pay_it_back(monkeypatch):
    cpu = torch.device("cpu")
    auto = pretrain.TrainConfig()
    assert auto.compile == "auto"
    monkeypatch.setattr(pretrain.shutil, "which", lambda name: "/usr/bin/" + name)
    assert pretrain.decide_compile(auto, cpu, None, 5.5)[0] is True
    assert pretrain.decide_compile(auto, cpu, 2000, None)[0] is True
    on, why = pretrain.decide_compile(auto, cpu, 12, None)
    assert not on and "too short" in why
    assert not pretrain.decide_compile(auto, cpu, None, 1.0)[0]
    assert pretrain.decide_compile(pretrain.TrainConfig(compile="on"), cpu, 12, None)[0] is True
    assert pretrain.decide_compile(pretrain.TrainConfig(compile="off"), cpu, None, 60)[0] is False
    monkeypatch.setattr(pretrain.shutil, "which", lambda name: None)
    on, why = pretrain.decide_compile(auto, cpu, None, 60)
    assert not on and "C++ compiler" in why
    # a run written before compile became auto | on | off
    assert pretrain.TrainConfig(compile=False).validate().compile == "off"
    with pytest.raises(pretrain.ConfigError):
        pretrain.TrainConfig(compile="sometimes").validate()


def test_the_log_says_whether_the_run_compiled_and_why(corpus, tmp_path, capsys):
    assert pretrain.main(args(corpus, tmp_path / "run", "--max-steps", "2")) == 0
    assert "compile: off (auto: a run of 2 steps is too short" in capsys.readouterr().out


def test_the_chunked_head_trains_as_the_logits_path(corpus, tmp_path):
    """`loss_chunk` (the head and the loss a chunk of tokens at a time): the same per-step losses as the
    plain path in fp32, to float tolerance, with z-loss on (the default), and the same held-out losses."""
    held_out = ("--eval-data", str(corpus / "shards"))
    pretrain.main(args(corpus, tmp_path / "plain", "--max-steps", "4", *held_out, *FP32))
    pretrain.main(args(corpus, tmp_path / "chunked", "--max-steps", "4", "--set", "loss_chunk=48", *held_out, *FP32))
    for (s1, a), (s2, b) in zip(losses(tmp_path / "plain"), losses(tmp_path / "chunked"), strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4)
    evals = [[r for r in read_metrics(run) if "eval_loss" in r] for run in (tmp_path / "plain", tmp_path / "chunked")]
    assert evals[0] and len(evals[0]) == len(evals[1])
    for a, b in zip(*evals):
        assert a.keys() == b.keys() and "eval_loss" in a
        for key in (k for k in a if k.startswith("eval_loss")):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_the_chunked_head_under_fsdp_trains_as_one_process(corpus, tmp_path):
    """`loss_chunk` under FSDP2 (two processes, gloo): the head is gathered inside the model's forward as for
    logits, so the per-step losses are one process's on the whole batch."""
    pretrain.main(args(corpus, tmp_path / "one", "--max-steps", "3", "--set", "batch_size=4", *FP32))
    _torchrun(corpus, tmp_path / "two", "--fsdp", "--max-steps", "3", "--set", "batch_size=2",
              "--set", "loss_chunk=40", *FP32)
    for (s1, a), (s2, b) in zip(losses(tmp_path / "one"), losses(tmp_path / "two"), strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4)
