"""The scale paths of the decoder's trainer: a checkpoint written under FSDP2 resumes in one process and the
other way round, and on CUDA (bf16, NCCL) FSDP2, compile, activation checkpointing and the attention
backends train as one eager SDPA process does.

CPU tests run two processes over gloo through the real torchrun entry point, in fp32 (they check the
arithmetic of sharding and re-partitioning, which bf16's rounding would blur). GPU tests are marked `gpu` and
skip without CUDA; the two-process ones need two GPUs (NCCL puts one rank on each).
"""

import pytest
import torch
from fixtures import run_torchrun
from test_pretrain import FP32, args, corpus, losses  # noqa: F401  (corpus: the fixture)

from tessera.train import pretrain

# Resumed across launch modes, the per-step losses follow a straight run's to this relative tolerance: the
# states are the same numbers, but sharded reductions sum in another order (measured: within 1e-6).
CROSS_RESUME_REL = 1e-4
STEPS = 6


def _torchrun(data, out, *extra, device: str = "cpu"):
    argv = [a if a != "cpu" else device for a in args(data, out, *extra)]  # args() pins --device cpu
    run_torchrun(["tessera.train.pretrain", *argv])


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):  # noqa: F811
    """One process, STEPS steps, global batch 4: the run the resumed ones must follow."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert pretrain.main(args(corpus, out, "--max-steps", str(STEPS), "--set", "batch_size=4", *FP32)) == 0
    return losses(out)


def _assert_follows(run, straight):
    got = losses(run)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    for (s, a), (_, b) in zip(straight, got):
        assert b == pytest.approx(a, rel=CROSS_RESUME_REL), f"step {s}"


def test_a_checkpoint_written_under_fsdp_resumes_in_one_process(corpus, straight, tmp_path):  # noqa: F811
    """Two FSDP2 processes (batch 2 each) train half the schedule; one process (batch 4: the same global
    batch) resumes the checkpoint, its full weights and optimizer state, and continues the data stream where
    the two ranks left it, so every step's loss is the straight run's."""
    run = tmp_path / "run"
    _torchrun(corpus, run, "--fsdp", "--set", f"steps={STEPS}", "--max-steps", str(STEPS // 2),
              "--set", "batch_size=2", *FP32)
    assert pretrain.main(args(corpus, run, "--resume", "--max-steps", str(STEPS), "--set", "batch_size=4",
                              *FP32)) == 0
    _assert_follows(run, straight)


def test_fsdp_in_one_process_is_a_one_line_error(corpus, tmp_path, capsys):  # noqa: F811
    assert pretrain.main(args(corpus, tmp_path / "run", "--fsdp", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "launch with torchrun" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before --out is written


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_fsdp(corpus, straight, tmp_path):  # noqa: F811
    """The reverse: one process trains half the schedule, two FSDP2 processes resume it."""
    run = tmp_path / "run"
    assert pretrain.main(args(corpus, run, "--set", f"steps={STEPS}", "--max-steps", str(STEPS // 2),
                              "--set", "batch_size=4", *FP32)) == 0
    _torchrun(corpus, run, "--fsdp", "--resume", "--max-steps", str(STEPS), "--set", "batch_size=2", *FP32)
    _assert_follows(run, straight)


# ------------------------------------------------------------------------------------------------ CUDA
# bf16 on CUDA: the paths differ in where they round (FSDP2's mixed precision casts the parameters, autocast
# the matmul inputs; compiled kernels fuse), so losses agree to bf16's precision, not exactly.
BF16 = ("--set", "dtype=bf16")
BF16_REL = 2e-2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")


def _cuda(data, out, *extra):
    argv = [a if a != "cpu" else "cuda" for a in args(data, out, "--max-steps", "4", *BF16, *extra)]
    assert pretrain.main(argv) == 0
    return losses(out)


def _assert_close(a, b, rel):
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (s, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=rel), f"step {s}"


@pytest.mark.gpu
@needs_cuda
@needs_two_gpus
def test_fsdp_on_cuda_matches_one_process(corpus, tmp_path):  # noqa: F811
    """FSDP2 over NCCL, bf16 mixed precision, two GPUs with batch 2 each vs one GPU with batch 4."""
    one = _cuda(corpus, tmp_path / "one", "--set", "batch_size=4")
    _torchrun(corpus, tmp_path / "fsdp", "--fsdp", "--max-steps", "4", "--set", "batch_size=2", *BF16, device="cuda")
    _assert_close(one, losses(tmp_path / "fsdp"), BF16_REL)


@pytest.mark.gpu
@needs_cuda
@needs_two_gpus
def test_fsdp_checkpoint_on_cuda_resumes_in_one_process(corpus, tmp_path):  # noqa: F811
    straight = _cuda(corpus, tmp_path / "straight", "--set", "batch_size=4")
    run = tmp_path / "run"
    _torchrun(corpus, run, "--fsdp", "--set", "steps=4", "--max-steps", "2", "--set", "batch_size=2", *BF16,
              device="cuda")
    _cuda(corpus, run, "--resume", "--set", "batch_size=4")
    _assert_close(straight, losses(run), BF16_REL)


@pytest.mark.gpu
@needs_cuda
def test_compiled_training_on_cuda_matches_eager(corpus, tmp_path):  # noqa: F811
    eager = _cuda(corpus, tmp_path / "eager", "--compile", "off")
    compiled = _cuda(corpus, tmp_path / "compiled", "--compile", "on")
    _assert_close(eager, compiled, BF16_REL)


@pytest.mark.gpu
@needs_cuda
def test_activation_checkpointing_on_cuda_trains_as_without(corpus, tmp_path):  # noqa: F811
    """Recomputing a block in the backward pass gives the same activations, so the same losses (to the
    nondeterminism of CUDA's reductions)."""
    plain = _cuda(corpus, tmp_path / "plain", "--compile", "off")
    ac = _cuda(corpus, tmp_path / "ac", "--compile", "off", "--set", "activation_checkpointing=true")
    _assert_close(plain, ac, 1e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_attention_backends_on_cuda_train_as_sdpa(corpus, tmp_path, backend):  # noqa: F811
    """Packed rows with document masks: SDPA (the default), FlexAttention and flash-attn (where installed)."""
    from tessera.model.attention import flash_attn_available

    if backend == "flash" and not flash_attn_available():
        pytest.skip("needs the flash-attn package")
    sdpa = _cuda(corpus, tmp_path / "sdpa", "--compile", "off")
    other = _cuda(corpus, tmp_path / backend, "--compile", "off", "--set", f"model.attn_backend={backend}")
    _assert_close(sdpa, other, BF16_REL)
