"""Codec training on data or losses that go bad: a batch with no readable image and a NaN/Inf loss skip their
step and are counted; too many in a row stop the run with a one-line error, never a hang or a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures import codec_train_argv, write_image_folder, write_speech_folder

from tessera.cli import main as cli
from tessera.storage import load_tensors
from tessera.runtime.monitor import read_metrics


def write_corrupt_images(d, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"bad_{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2)


def test_a_folder_of_only_corrupt_images_is_refused_before_training(tmp_path, capsys):
    """Before the first step: a short run (3 steps) on such a folder had exited 0 with an untrained codec."""
    write_corrupt_images(tmp_path / "data", 5)
    rc = cli(codec_train_argv("image", tmp_path / "data", tmp_path / "run", "--max-steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "the 4 training images are unusable (corrupt" in err[0], err  # 1 of the 5 is held out
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "codec.json").exists()


@pytest.mark.timeout(600)  # the loop this replaced never ended
def test_a_folder_of_corrupt_images_stops_with_an_error_instead_of_looping(tmp_path, capsys, monkeypatch):
    """Every batch is empty: each one is a skipped step, and `max_empty_batches` (10) in a row end the run at
    step 10 with an error naming the cause (before, the loop skipped without counting a step: forever). The
    up-front probe is turned off: it would refuse this folder before the loop."""
    from tessera.unimodal.image_train import ImageRecipe

    monkeypatch.setattr(ImageRecipe, "PROBES", 0)
    write_corrupt_images(tmp_path / "data", 10)
    rc = cli(codec_train_argv("image", tmp_path / "data", tmp_path / "run", "--max-steps", "50"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "10 batches in a row had no readable sample (step 10)" in err[0] and "corrupt" in err[0], err
    recs = [r for r in read_metrics(tmp_path / "run") if r.get("empty_batch")]
    assert [r["step"] for r in recs] == list(range(1, 11)) and recs[-1]["empty_batches"] == 10
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no checkpoint of an untrained codec


def test_empty_batches_among_good_ones_are_counted_steps(tmp_path):
    """Batches of one image from 1 good and 3 corrupt files: the empty ones are skipped steps, the run ends at
    --max-steps and reports them in the summary and in metrics.jsonl."""
    write_image_folder(tmp_path / "data" / "train", 1)
    write_corrupt_images(tmp_path / "data" / "train", 3)
    write_image_folder(tmp_path / "data" / "test", 2, seed=1)
    run = tmp_path / "run"
    assert cli(codec_train_argv("image", tmp_path / "data", run, "--max-steps", "8", "--set", "batch_size=1")) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["step"] == 8 and summary["empty_batches"] == 6  # two epochs of 4 batches, 3 of them empty
    assert summary["skipped"]["counts"] == {"corrupt": 3}
    recs = read_metrics(run)
    assert len([r for r in recs if r.get("empty_batch")]) == 6
    assert len([r for r in recs if "train/loss" in r]) == 2


def inject_nan(monkeypatch, kind: str, calls) -> dict:
    """Make the training loss NaN on the given training calls of a loss term (counted from 1; `all`: every
    call). The image codec's SSIM term, the audio codec's mel loss; evaluation (no grad) is untouched."""
    seen = {"n": 0}

    def poisoned(value):
        if not torch.is_grad_enabled():
            return value
        seen["n"] += 1
        return value * float("nan") if calls == "all" or seen["n"] in calls else value

    if kind == "image":
        from tessera.unimodal import image_train

        real = image_train.ssim
        monkeypatch.setattr(image_train, "ssim", lambda *a, **k: poisoned(real(*a, **k)))
    else:
        from tessera.unimodal import audio_train

        class NaNMel(audio_train.MultiScaleMel):
            def forward(self, *a, **k):
                return poisoned(super().forward(*a, **k))

        monkeypatch.setattr(audio_train, "MultiScaleMel", NaNMel)
    return seen


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("nan_data")
    write_image_folder(d / "image" / "train", 8)
    write_image_folder(d / "image" / "test", 2, seed=1)
    write_speech_folder(d / "audio", 12)
    return d


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_nan_loss_skips_its_step_and_training_goes_on(kind, data, tmp_path, monkeypatch):
    inject_nan(monkeypatch, kind, {2, 3})
    run = tmp_path / "run"
    assert cli(codec_train_argv(kind, data / kind, run, "--max-steps", "5")) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["step"] == 5 and summary["nan_skips"] == 2
    assert [r["step"] for r in read_metrics(run) if r.get("nan_skip")] == [2, 3]
    weights = load_tensors(run / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_nan_losses_in_a_row_stop_the_run_with_a_clear_error(kind, data, tmp_path, monkeypatch, capsys):
    """A run of 2 good steps is resumed with every loss NaN: steps 3 to 7 are skipped and the fifth in a row
    (max_nan_skips) stops the run with one line; the checkpoint of step 2 is kept, with finite weights."""
    run = tmp_path / "run"
    assert cli(codec_train_argv(kind, data / kind, run, "--max-steps", "2")) == 0
    inject_nan(monkeypatch, kind, "all")
    capsys.readouterr()
    rc = cli(codec_train_argv(kind, data / kind, run, "--max-steps", "20", "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "5 non-finite steps in a row at step 7" in err[0] and "checkpoint (2) is kept" in err[0], err
    assert [r["step"] for r in read_metrics(run) if r.get("nan_skip")] == [3, 4, 5, 6, 7]
    weights = load_tensors(run / "model.safetensors")
    assert all(np.isfinite(v.float().numpy()).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.parametrize("bound", [["--max-steps", "-3"], ["--max-minutes", "-1"]])
def test_a_negative_budget_is_refused_before_anything_is_written(tmp_path, capsys, bound):
    write_image_folder(tmp_path / "data", 2)
    assert cli(codec_train_argv("image", tmp_path / "data", tmp_path / "run", *bound)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bound[0]} must be"), err
    assert not (tmp_path / "run").exists()


def test_a_second_codec_run_into_the_same_out_is_refused(tmp_path, capsys):
    """The run's lock (`OUT/.lock`, as the decoder's trainer takes it): two runs never write one directory."""
    from tessera.runtime.checkpoint import RunLock

    write_image_folder(tmp_path / "data", 2)
    with RunLock(tmp_path / "run", command="the first run"):
        assert cli(codec_train_argv("image", tmp_path / "data", tmp_path / "run", "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the first run" in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert cli(codec_train_argv("image", tmp_path / "data", tmp_path / "run", "--max-steps", "1")) == 0  # freed
