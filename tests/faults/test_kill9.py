"""kill -9 at a random point of pretokenize and of codec training, then the same command resumes to the
result of a run that was never killed (pretrain's own are in test_resume.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from fixtures import codec_train_argv, kill_when, write_image_folder, write_speech_folder
from PIL import Image

from tessera.cli import main as cli
from tessera.storage import load_tensors
from tessera.runtime.checkpoint import CheckpointManager


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_kill_9_during_codec_training_then_resume_matches_a_clean_run(kind, tmp_path):
    data = tmp_path / "data"
    if kind == "image":
        write_image_folder(data, 12, seed=0)
    else:
        write_speech_folder(data, 12)
    steps, common = 8, ["--set", "cooldown=0", "--set", "dtype=fp32", "--set", "ckpt_every=1"]
    assert cli(codec_train_argv(kind, data, tmp_path / "clean", "--max-steps", str(steps), *common)) == 0
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tessera", *codec_train_argv(kind, data, run, "--max-steps", str(steps), *common)]
    kill_when(cmd, lambda: (run / "checkpoints" / "latest").exists())
    killed_at = CheckpointManager(run).latest_step()
    assert killed_at is not None and killed_at < steps
    assert not (run / "model.safetensors").exists() or killed_at < steps  # killed before its end
    assert cli(codec_train_argv(kind, data, run, "--max-steps", str(steps), "--resume", *common)) == 0
    a, b = load_tensors(tmp_path / "clean" / "model.safetensors"), load_tensors(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_during_pretokenize_then_rerun_matches_a_clean_run(codec_bundle, tmp_path):
    rng = np.random.default_rng(0)
    docs = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        docs.append({"segments": [{"text": f"picture number {i}"}, {"image": f"{i}.png"}], "source": "draw"})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def argv(out):
        return ["data", "pretokenize", "--tokenizer", str(codec_bundle), "--input", str(tmp_path / "docs.jsonl"),
                "--out", str(out), "--workers", "1", "--docs-per-shard", "2", "--device", "cpu"]

    assert cli(argv(tmp_path / "clean")) == 0
    out = tmp_path / "killed"
    kill_when([sys.executable, "-m", "tessera", *argv(out)], lambda: (out / "shard_00002.tokens").exists())
    assert not json.loads((out / "manifest.json").read_text()).get("complete")
    assert cli(argv(out)) == 0  # the same command resumes
    clean = sorted(p.name for p in (tmp_path / "clean").glob("shard_*"))
    assert sorted(p.name for p in out.glob("shard_*")) == clean
    for name in clean:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "clean", out))
    assert a["docs"] == b["docs"] and a["tokens"] == b["tokens"] and b["complete"]
