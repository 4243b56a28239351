"""Training overrides and run directories that cannot work are one-line errors, not tracebacks or empty runs."""

import json

import pytest
import torch

import tessera
from tessera.config import to_dict
from tessera.model.api import LoadError
from tessera.model.transformer import ModelConfig, Transformer, model_preset
from tessera.storage import atomic_write_json, save_tensors
from tessera.tokenizers import build_bundle
from tessera.tokenizers.bundle import read_bundle_spec
from tessera.train import pretrain
from tessera.train.pretokenize import PretokenizeConfig, pretokenize


@pytest.fixture(scope="module")
def data(tmp_path_factory, text_dir):
    d = tmp_path_factory.mktemp("runcfg")
    (d / "docs.jsonl").write_text("".join(json.dumps({"segments": [{"text": f"the digit {i % 10}"}]}) + "\n"
                                          for i in range(20)))
    build_bundle(d / "bundle", text_dir)
    pretokenize(d / "bundle", [d / "docs.jsonl"], d / "shards", PretokenizeConfig(workers=1), progress=False)
    return d


@pytest.mark.parametrize("override, key", [
    ("grad_accum=0", "grad_accum"),
    ("batch_size=0", "batch_size"),
    ("dtype=fp16", "dtype"),
    ("log_every=0", "log_every"),
    ("schedule=linear", "schedule"),
    ("model.attn_backend=flsh", "attn_backend"),
])
def test_bad_training_override_is_one_line_error(data, tmp_path, capsys, override, key):
    out = tmp_path / "run"
    rc = pretrain.main(["--preset", "tiny", "--tokenizer", str(data / "bundle"), "--data", str(data / "shards"),
                        "--out", str(out), "--max-steps", "1", "--set", "seq_len=32", "--set", override,
                        "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {key} must be"), err
    assert not (out / "model.safetensors").exists()


def _fake_run(d, text_dir, weights_cfg: ModelConfig | None = None, drop: str | None = None):
    """A run directory as training writes it, with weights from a random model (no training needed)."""
    build_bundle(d / "tokenizer", text_dir)
    spec = read_bundle_spec(d / "tokenizer")
    mcfg = model_preset("tiny")
    mcfg.vocab_size = tessera.tokenizers.VocabLayout.from_dict(spec["layout"]).padded_vocab_size
    config = {"format": "tessera-run", "version": 1, "model": to_dict(mcfg), "tokenizer_hash": spec["hash"],
              "layout": spec["layout"]}
    if drop:
        del config[drop]
    atomic_write_json(d / "config.json", config)
    wcfg = weights_cfg or mcfg
    if not wcfg.vocab_size:
        wcfg.vocab_size = mcfg.vocab_size
    save_tensors(d / "model.safetensors", Transformer(wcfg).state_dict())
    return d


def test_load_refuses_weights_of_the_wrong_shape(tmp_path, text_dir):
    run = _fake_run(tmp_path, text_dir, weights_cfg=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2))
    with pytest.raises(LoadError, match=r"model.safetensors: .* has shape .*config.json"):
        tessera.load(run, device="cpu")


@pytest.mark.parametrize("key", ["tokenizer_hash", "model"])
def test_load_refuses_a_config_without_a_required_key(tmp_path, text_dir, key):
    with pytest.raises(LoadError, match=f"config.json has no {key!r}"):
        tessera.load(_fake_run(tmp_path, text_dir, drop=key), device="cpu")


def _train_argv(data, out, *extra):
    return ["--preset", "tiny", "--tokenizer", str(data / "bundle"), "--data", str(data / "shards"), "--out",
            str(out), "--set", "seq_len=32", "--device", "cpu", "--compile", "off", *extra]


@pytest.mark.parametrize("bound", [["--max-steps", "-3"], ["--max-minutes", "-1"], ["--max-minutes", "nan"]])
def test_a_negative_or_nan_budget_is_one_line_error_and_creates_nothing(data, tmp_path, capsys, bound):
    out = tmp_path / "run"
    assert pretrain.main(_train_argv(data, out, *bound)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bound[0]} must be"), err
    assert not out.exists()


def test_resuming_with_another_preset_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(_train_argv(data, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    assert pretrain.main(_train_argv(data, out, "--max-steps", "2", "--resume")) == 0  # the same preset resumes
    assert pretrain.main([a if a != "tiny" else "demo" for a in _train_argv(data, out, "--max-steps", "3",
                                                                            "--resume")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "not the 'demo' preset" in err[-1] and len([e for e in err if e.startswith("error")]) == 1, err
    assert json.loads((out / "train_summary.json").read_text())["step"] == 2


@pytest.mark.parametrize("device", ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_device_that_is_not_there_is_one_line_error(data, tmp_path, capsys, device):
    argv = _train_argv(data, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--device") + 1] = device
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --device {device}"), err


@pytest.mark.parametrize("flags, name", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "100000"], "max_new_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-audio-seconds", "-1"], "max_audio_seconds"),
    (["--samples", "0"], "--samples"),
])
def test_generate_arguments_out_of_range_are_one_line_errors(tmp_path, text_dir, capsys, flags, name):
    from tessera.cli import main as cli

    run = _fake_run(tmp_path / "run", text_dir)
    assert cli(["generate", "--model", str(run), "--prompt", "hi", "--out", str(tmp_path / "gen"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0], err


def test_no_progress_leaves_out_the_bar_as_the_codec_trainers_do(data, tmp_path, capsys):
    assert pretrain.main(_train_argv(data, tmp_path / "a", "--max-steps", "2")) == 0
    assert "pretrain:" in capsys.readouterr().err  # the bar, for contrast
    assert pretrain.main(_train_argv(data, tmp_path / "b", "--max-steps", "2", "--no-progress")) == 0
    assert "pretrain:" not in capsys.readouterr().err


@pytest.mark.parametrize("size", [0, -5])
def test_codec_eval_refuses_a_size_of_no_pixels(size):
    """`tokenizer eval image --size 0` evaluated at the default size; -5 was "not a multiple of 8"."""
    from types import SimpleNamespace

    from tessera.errors import TesseraError
    from tessera.unimodal.image_eval import _load_images

    codec = SimpleNamespace(info=SimpleNamespace(downsample=8, default_size=(64, 64)))
    with pytest.raises(TesseraError, match="^--size must be a positive number of pixels"):
        _load_images([], codec, SimpleNamespace(size=size, native=False, max_pixels=None), None)
