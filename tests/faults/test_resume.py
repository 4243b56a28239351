"""Resume is exact after any interruption: under torchrun, after kill -9, with half-deleted checkpoints; and it
refuses data other than the run's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import kill_when, torchrun_argv

from tessera.runtime import checkpoint as checkpoint_mod
from tessera.runtime.checkpoint import CheckpointManager
from tessera.runtime.monitor import read_metrics
from tessera.storage import load_tensors
from tessera.tokenizers import build_bundle
from tessera.train import pretrain
from tessera.train.pretokenize import PretokenizeConfig, pretokenize

WORDS = ["seven", "eight", "digit", "a", "the", "drawing", "of", "is", "what", "this"]
FP32 = ("--set", "dtype=fp32")  # exact comparisons: no bf16 rounding on CPUs that have it


def _write_docs(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(int(rng.integers(2, 40))))
            f.write(json.dumps({"segments": [{"text": words}], "source": str(rng.choice(["a", "b"]))}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, text_dir):
    """250 documents of uneven lengths in uneven shards (60, 60, 60, 60, 10), and a second, other corpus."""
    d = tmp_path_factory.mktemp("resume")
    build_bundle(d / "bundle", text_dir)
    _write_docs(d / "docs.jsonl", 250, seed=0)
    pretokenize(d / "bundle", [d / "docs.jsonl"], d / "shards", PretokenizeConfig(workers=1, docs_per_shard=60),
                progress=False)
    _write_docs(d / "other.jsonl", 120, seed=1)
    pretokenize(d / "bundle", [d / "other.jsonl"], d / "other", PretokenizeConfig(workers=1, docs_per_shard=60),
                progress=False)
    return d


def args(corpus, out, *extra):
    return ["--preset", "tiny", "--tokenizer", str(corpus / "bundle"), "--data", str(corpus / "shards"),
            "--out", str(out), "--set", "seq_len=64", "--set", "batch_size=2", "--set", "log_every=1",
            "--set", "warmup_steps=2", "--device", "cpu", *FP32, *extra]


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def weights(run):
    return load_tensors(Path(run) / "model.safetensors")


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def torchrun_cmd(out_args):
    return [*torchrun_argv(2),
            "-m", "tessera.train.pretrain", *out_args]


def torchrun(out_args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = torchrun_cmd(out_args)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# -------------------------------------------------------------------------------- 1. multi-process resume
STEPS, CUT = 12, 5


@pytest.fixture(scope="module")
def two_process_runs(corpus, tmp_path_factory):
    """A straight two-process run of STEPS steps, and one stopped after CUT (a checkpoint, then the end)."""
    d = tmp_path_factory.mktemp("ddp")
    fixed = ("--set", f"steps={STEPS}")
    torchrun(args(corpus, d / "straight", *fixed, "--max-steps", str(STEPS)))
    torchrun(args(corpus, d / "cut", *fixed, "--max-steps", str(CUT)))
    return d


def test_two_process_resume_matches_a_straight_run(corpus, two_process_runs, tmp_path):
    """Every rank's loader state is saved and restored: rank 1 does not rerun its last window after a resume."""
    run = tmp_path / "resumed"
    shutil.copytree(two_process_runs / "cut", run)
    torchrun(args(corpus, run, "--resume", "--max-steps", str(STEPS)))
    straight = losses(two_process_runs / "straight")
    assert len(straight) == STEPS
    assert losses(run) == straight  # bit-identical, the steps after the resume included
    assert same_weights(run, two_process_runs / "straight")
    state = json.loads((run / "checkpoints" / f"step_{CUT:06d}" / "state.json").read_text())
    assert [s["rank"] for s in state["loaders"]] == [0, 1] and state["world_size"] == 2


def test_resume_on_another_number_of_processes_continues_the_stream(corpus, two_process_runs, tmp_path, capsys):
    """A two-process checkpoint resumed by one process with the same global batch: the data stream goes on
    at the first window no rank had taken (none repeated or skipped), so the losses are the straight run's
    up to the arithmetic of splitting a batch."""
    run = tmp_path / "one"
    shutil.copytree(two_process_runs / "cut", run)
    assert pretrain.main(args(corpus, run, "--resume", "--max-steps", str(STEPS), "--set", "batch_size=4")) == 0
    straight, resumed = losses(two_process_runs / "straight"), losses(run)
    assert [s for s, _ in resumed] == [s for s, _ in straight]
    for (_, a), (_, b) in zip(straight[CUT:], resumed[CUT:]):
        assert b == pytest.approx(a, rel=1e-5)
    assert "saved by 2 process(es), this run has 1" in capsys.readouterr().out


def test_each_rank_restores_its_own_loader_state_or_the_stream_position(tmp_path):
    """Loader level: two ranks restored from their own states continue exactly; one rank restored from the
    two ranks' states takes exactly the windows a single process would take next."""
    from tessera.tokenizers.layout import VocabLayout
    from tessera.train.loader import LoaderConfig, PackedLoader
    from tessera.train.shards import write_token_shards

    layout = VocabLayout(text_size=100, image_codebook_size=16, audio_codebook_size=8, audio_levels=2, max_grid=8,
                         n_reserved=4)
    rng = np.random.default_rng(0)
    docs = [[1, *rng.integers(3, 100, int(rng.integers(1, 30))).tolist(), 2] for _ in range(90)]
    write_token_shards(tmp_path / "s", docs, layout.to_dict(), "hash", docs_per_shard=13)
    cfg = LoaderConfig(seq_len=24, batch_size=3, seed=2)

    def ranks(world):
        return [PackedLoader(tmp_path / "s", cfg, layout, rank=r, world_size=world) for r in range(world)]

    two = ranks(2)
    for _ in range(4):
        [ld.next_batch() for ld in two]
    states = json.loads(json.dumps([ld.state_dict() for ld in two]))
    expect = [[ld.next_batch()["input_ids"] for _ in range(3)] for ld in two]
    again = ranks(2)
    for ld in again:
        assert ld.load_rank_states(states) is False
    assert all(torch.equal(a, ld.next_batch()["input_ids"]) for ld, e in zip(again, expect) for a in e)

    single = PackedLoader(tmp_path / "s", cfg, layout)
    for _ in range(8):  # the 24 windows the two ranks took
        single.next_batch()
    (one,) = ranks(1)
    assert one.load_rank_states(states) is True
    for _ in range(3):
        assert torch.equal(one.next_batch()["input_ids"], single.next_batch()["input_ids"])
    with pytest.raises(ValueError, match="saved by one of 2 ranks"):
        ranks(1)[0].load_state_dict(states[1])


# ---------------------------------------------------------------------------------- 3. the data checked
def test_resume_with_other_data_is_refused_before_anything_is_written(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain.main(args(corpus, run, "--max-steps", "2", "--set", "steps=4")) == 0
    def files():  # all but .lock, which records the last process that held the run
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    capsys.readouterr()
    other = args(corpus, run, "--resume", "--max-steps", "4")
    other[other.index("--data") + 1] = str(corpus / "other")
    assert pretrain.main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the data" in err[0] and str(corpus / "shards") in err[0], err
    assert files() == before  # config.json untouched
    # the same shards moved elsewhere are the same data
    moved = tmp_path / "moved"
    shutil.copytree(corpus / "shards", moved)
    same = args(corpus, run, "--resume", "--max-steps", "4")
    same[same.index("--data") + 1] = str(moved)
    assert pretrain.main(same) == 0
    assert json.loads((run / "config.json").read_text())["data"] == str(moved.resolve())


# ------------------------------------------------------------------------------ 4. half-deleted checkpoints
class Killed(BaseException):
    """Stands for the process being killed: nothing after it runs."""


def _dying_rmtree(first: str):
    """shutil.rmtree that deletes one file (`first`) of the tree and is then killed."""
    real = shutil.rmtree

    def rmtree(path, *a, **kw):
        victim = Path(path) / first
        if victim.exists():
            victim.unlink()
            raise Killed(path)
        return real(path, *a, **kw)
    return rmtree


@pytest.mark.parametrize("first", ["state.json", "model.safetensors"])
def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch, first):
    ckpt = CheckpointManager(tmp_path, keep=1)
    t = {"w": torch.zeros(3)}
    ckpt.save(1, {"model": t, "optimizer": t}, {"x": 1})
    monkeypatch.setattr(checkpoint_mod.shutil, "rmtree", _dying_rmtree(first))
    with pytest.raises(Killed):
        ckpt.save(2, {"model": t, "optimizer": t}, {"x": 2})  # pruning step 1 is killed halfway
    monkeypatch.undo()
    for d in (tmp_path / "checkpoints").glob("step_*"):  # every step_N left is whole
        assert {p.name for p in d.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}, d
    # the next start cleans up; only the latest checkpoint is left, and it loads
    fresh = CheckpointManager(tmp_path, keep=1)
    fresh.clean()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000002"]
    assert fresh.load()[1]["x"] == 2


def test_a_checkpoint_without_its_completion_marker_is_never_loaded(corpus, tmp_path, capsys):
    """An older tessera's half-deleted step_N (state.json or a tensor file gone) is not loaded, even when
    `latest` names it; the run resumes from the newest whole checkpoint and removes the broken ones."""
    run = tmp_path / "run"
    assert pretrain.main(args(corpus, run, "--max-steps", "6", "--set", "steps=8", "--set", "ckpt_every=2",
                              "--set", "keep_checkpoints=3")) == 0
    root = run / "checkpoints"
    (root / "step_000002" / "state.json").unlink()
    (root / "step_000006" / "model.safetensors").unlink()  # the one `latest` names
    shutil.copytree(root / "step_000004", root / ".trash-step_000000")  # a prune of this version, killed
    assert CheckpointManager(run).latest_step() == 4
    capsys.readouterr()
    assert pretrain.main(args(corpus, run, "--resume", "--max-steps", "8")) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 4" in out
    assert "removed what an interrupted save or prune left" in out
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000006", "step_000008"]
    for d in root.glob("step_*"):
        assert {p.name for p in d.iterdir()} == {"model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                                 "state.json"}, d


# ------------------------------------------------------------------------------------ 5. kill -9, resume
def kill_after_first_checkpoint(cmd, run: Path, env=None) -> int:
    """SIGKILL `cmd` (and its workers) once `run` holds a checkpoint; the step of the checkpoint that survived."""
    kill_when(cmd, lambda: (run / "checkpoints" / "latest").exists(), env)
    return CheckpointManager(run).latest_step()


def test_kill_9_during_pretrain_then_resume_matches_a_clean_run(corpus, tmp_path):
    """pretrain in a subprocess, SIGKILLed once a checkpoint exists, resumed: the final weights and the losses
    are the uninterrupted run's. The kernel released the dead run's lock."""
    steps = 20
    fixed = ("--set", f"steps={steps}", "--max-steps", str(steps))
    assert pretrain.main(args(corpus, tmp_path / "clean", *fixed)) == 0
    run = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(
        [sys.executable, "-m", "tessera.train.pretrain", *args(corpus, run, *fixed, "--set", "ckpt_every=2")], run)
    assert killed_at is not None and killed_at < steps
    assert max(r["step"] for r in read_metrics(run)) < steps  # killed before the end
    # checkpoints change nothing in training: the rest of the run saves only at its end
    assert pretrain.main(args(corpus, run, "--resume", "--max-steps", str(steps), "--set", "ckpt_every=0")) == 0
    assert same_weights(run, tmp_path / "clean")
    assert losses(run) == losses(tmp_path / "clean")


def test_kill_9_under_torchrun_then_resume_matches_a_straight_run(corpus, two_process_runs, tmp_path):
    """The same for two processes, torchrun and both workers killed at once (a lost node): the resumed run's
    losses and final weights are the straight two-process run's, bit for bit."""
    run = tmp_path / "killed"
    cmd = torchrun_cmd(args(corpus, run, "--set", f"steps={STEPS}", "--set", "ckpt_every=2", "--max-steps", str(STEPS)))
    killed_at = kill_after_first_checkpoint(cmd, run, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed_at is not None and killed_at < STEPS
    assert max(r["step"] for r in read_metrics(run)) < STEPS  # killed before the end
    torchrun(args(corpus, run, "--resume", "--max-steps", str(STEPS), "--set", "ckpt_every=0"))
    assert losses(run) == losses(two_process_runs / "straight")
    assert same_weights(run, two_process_runs / "straight")
