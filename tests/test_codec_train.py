"""The image and the audio codec trainers behave alike where they share `tessera.unimodal.codec_train`:
checkpoint interval and precision keys (old names still read), an existing run without --resume, every
rank's RNG in a checkpoint, the step count without bounds, and an exact resume, old checkpoints included."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import codec_train_argv, write_image_folder, write_speech_folder

from tessera.cli import main as cli
from tessera.runtime.checkpoint import CheckpointManager
from tessera.runtime.monitor import read_metrics
from tessera.storage import load_tensors

KINDS = ["image", "audio"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec_data")
    write_image_folder(d / "image" / "train", 12, seed=0)
    write_image_folder(d / "image" / "test", 2, seed=1)
    write_speech_folder(d / "audio", 12)
    return d


def train(kind, data, out, *extra) -> int:
    return cli(codec_train_argv(kind, data / kind, out, *extra))


def train_records(kind, out) -> list[dict]:
    key = "train/loss" if kind == "image" else "loss"
    return [r for r in read_metrics(out) if key in r]


def as_old_checkpoint(kind, out, step) -> None:
    """Rewrite OUT's checkpoint at `step` in the layout the trainer wrote before codec_train: the image trainer
    named its optimizers opt_g/opt_d, kept rank 0's RNG and data RNG only, and called dtype `amp`; the audio
    trainer called ckpt_every `save_every` and dtype `precision`. Neither saved the preset, the plan or the
    skip counters."""
    ckpt = CheckpointManager(out)
    tensors, state = ckpt.load(step)
    for key in ("preset", "schedule", "nan_skips", "empty_batches"):
        state.pop(key, None)
    tcfg = state["train_config"]
    if kind == "image":
        tensors["opt_g"], state["opt_g"] = tensors.pop("optimizer"), state.pop("optimizer")
        tensors["rng"] = {k[len("r0."):]: v for k, v in tensors["rng"].items() if k.startswith("r0.")}
        state["rng"] = state["rng"]["0"]
        state["dataset_rng"] = state.pop("ranks")["0"]["dataset_rng"]
        tcfg["amp"] = {"fp32": "off"}.get(tcfg.pop("dtype"), "auto")
    else:
        state.pop("ranks")
        tcfg["save_every"], tcfg["precision"] = tcfg.pop("ckpt_every"), tcfg.pop("dtype")
    for key in ("max_nan_skips", "max_empty_batches"):
        tcfg.pop(key)
    if kind == "audio":
        tcfg.pop("weight_decay")
    state.pop("step")
    ckpt.save(step, tensors, state)


@pytest.mark.parametrize("kind", KINDS)
def test_an_existing_run_is_resumed_or_refused_never_overwritten(kind, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(kind, data, out, "--max-steps", "1") == 0
    before = (out / "checkpoints" / "step_000001" / "state.json").read_text()
    capsys.readouterr()
    assert train(kind, data, out, "--max-steps", "2") == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err
    assert (out / "checkpoints" / "step_000001" / "state.json").read_text() == before
    assert not (out / "checkpoints" / "step_000002").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_ckpt_every_dtype_and_an_exact_resume_from_an_old_checkpoint(kind, data, tmp_path):
    """`ckpt_every` checkpoints with every rank's RNG; a run of 2 steps whose checkpoint is rewritten in the
    old layout (old key names) resumes to the weights of an uninterrupted 4-step run, bit for bit (fp32, CPU)."""
    common = ["--set", "cooldown=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(kind, data, straight, "--max-steps", "4", "--set", "ckpt_every=2", "--set", "dtype=fp32",
                 *common) == 0
    assert sorted(p.name for p in (straight / "checkpoints").glob("step_*")) == ["step_000002", "step_000004"]
    state = json.loads((straight / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["train_config"]["ckpt_every"] == 2 and state["train_config"]["dtype"] == "fp32"
    assert set(state["rng"]) == {"0"} and state["nan_skips"] == 0 and state["preset"] == "tiny"
    summary = json.loads((straight / "train_summary.json").read_text())
    assert summary["step"] == 4 and summary["stopped_by"] == "max_steps"

    old_dtype = "amp=off" if kind == "image" else "precision=fp32"
    with pytest.warns(FutureWarning, match="ckpt_every"):  # the old names still work, with a warning
        assert train(kind, data, split, "--max-steps", "2", "--set", "save_every=2", "--set", old_dtype, *common) == 0
    state = json.loads((split / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["train_config"]["ckpt_every"] == 2 and state["train_config"]["dtype"] == "fp32"
    as_old_checkpoint(kind, split, 2)
    assert train(kind, data, split, "--max-steps", "4", "--resume", *common) == 0
    assert [r["step"] for r in train_records(kind, split)] == [1, 2, 3, 4]
    a, b = load_tensors(straight / "model.safetensors"), load_tensors(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_dtype_is_a_one_line_error(kind, data, tmp_path, capsys):
    assert train(kind, data, tmp_path / "run", "--max-steps", "1", "--set", "dtype=fp16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dtype must be auto, bf16 or fp32"), err


@pytest.mark.timeout(600)  # the image codec trained until interrupted
@pytest.mark.parametrize("kind", KINDS)
def test_without_bounds_a_run_takes_the_decoders_default_steps(kind, data, tmp_path, monkeypatch):
    """No --max-steps or --max-minutes: DEFAULT_STEPS (1000; 3 here), as the decoder's trainer; a resumed run
    without bounds continues its plan, and one with a larger bound trains on."""
    from tessera.runtime import schedule

    monkeypatch.setattr(schedule, "DEFAULT_STEPS", 3)
    out = tmp_path / "run"
    assert train(kind, data, out) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 3 and summary["stopped_by"] == "max_steps" and summary["planned_steps"] == 3
    assert train(kind, data, out, "--resume") == 0
    assert json.loads((out / "train_summary.json").read_text())["step"] == 3
    assert train(kind, data, out, "--resume", "--max-steps", "4") == 0
    assert json.loads((out / "train_summary.json").read_text())["step"] == 4
