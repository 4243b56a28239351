"""Deterministic codecs that implement the codec protocol with arithmetic instead of networks, and small
helpers the tests share.

The codecs let the span logic of the multimodal tokenizer be tested exactly: `encode(decode(codes)) == codes`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tessera.unimodal.protocol import CodecInfo


class PatchMeanImageCodec:
    """Each f x f patch becomes the index of its mean gray level on a K-step ramp."""

    def __init__(self, codebook_size: int = 16, factor: int = 4, default_size=(16, 16)):
        self.info = CodecInfo(
            kind="image", codebook_size=codebook_size, downsample=factor, default_size=default_size, max_size=64
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        f, K = self.info.downsample, self.info.codebook_size
        assert H % f == 0 and W % f == 0, (H, W, f)
        g = images.float().mean(1)  # (B, H, W)
        m = g.reshape(B, H // f, f, W // f, f).mean((2, 4))
        return (m * (K - 1)).round().clamp(0, K - 1).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        f, K = self.info.downsample, self.info.codebook_size
        v = codes.float() / (K - 1)  # (B, h, w)
        x = v.repeat_interleave(f, 1).repeat_interleave(f, 2)
        return x[:, None].expand(-1, 3, -1, -1).contiguous()


class FrameLevelAudioCodec:
    """Each frame's mean becomes residual codes: level q quantizes what levels < q left over."""

    def __init__(self, codebook_size: int = 8, levels: int = 3, hop: int = 160, sample_rate: int = 16000):
        self.info = CodecInfo(
            kind="audio", codebook_size=codebook_size, levels=levels, downsample=hop, sample_rate=sample_rate
        )

    def _step(self, q: int) -> float:
        return 2.0 / (self.info.codebook_size**(q + 1))

    def encode(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        assert sample_rate == self.info.sample_rate
        B, T = waveform.shape
        hop, K = self.info.downsample, self.info.codebook_size
        n = -(-T // hop)
        w = torch.nn.functional.pad(waveform.float(), (0, n * hop - T))
        r = w.reshape(B, n, hop).mean(-1) + 1.0  # in [0, 2]
        codes = []
        for q in range(self.info.levels):
            c = (r / self._step(q)).floor().clamp(0, K - 1)
            codes.append(c.long())
            r = r - c * self._step(q)
        return torch.stack(codes, 1)

    def decode(self, codes: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        n_q = codes.shape[1] if n_q is None else n_q
        v = sum(codes[:, q].float() * self._step(q) for q in range(n_q)) - 1.0
        return v.repeat_interleave(self.info.downsample, 1)


def step_clock(monkeypatch, module, per_step: str, seconds_per_step: float = 0.1):
    """Make `module`'s run budget see a fake clock that advances `seconds_per_step` each time `module.per_step`
    (a function the trainer calls once a step) runs, and collect the progress bars it makes.

    Returns (steps, bars): the step counter ({"n": ...}) and the list of `Progress` objects."""
    import time
    import types

    from tessera.runtime import monitor, schedule

    steps, bars = {"n": 0}, []
    real = getattr(module, per_step)

    def counted(*a, **k):
        steps["n"] += 1
        return real(*a, **k)

    class Bar(monitor.Progress):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(module, per_step, counted)
    monkeypatch.setattr(module, "Progress", Bar)
    clock = types.SimpleNamespace(monotonic=lambda: seconds_per_step * steps["n"], time=time.time,
                                  strftime=time.strftime, gmtime=time.gmtime)
    monkeypatch.setattr(monitor, "time", clock)  # the progress bar's ETA
    monkeypatch.setattr(schedule, "time", clock)  # the run budget's clock
    return steps, bars


# ------------------------------------------------------------------------- tiny codec training runs
# Both codecs at a size that trains several steps a second on one CPU core (see tests/test_codec_train.py);
# the tiny presets evaluate and checkpoint every 250 steps or more, so these runs do both at their end only.
CODEC_MICRO = {
    "image": ["channels=8", "channel_mult=1,1,2,2", "num_res_blocks=1", "z_channels=16", "norm_groups=4",
              "image_size=16", "batch_size=4", "warmup_steps=2", "log_every=1", "cache_mb=64", "eval_images=4",
              "sample_images=2"],
    "audio": ["channels=4", "max_channels=16", "dim=16", "lstm_layers=0", "batch_size=4", "crop_seconds=0.32",
              "init_vectors=256", "eval_clips=3", "log_every=1", "max_clip_seconds=1.0", "ae_warmup_steps=1"],
}


def write_image_folder(d, n: int, seed: int = 0, size: int = 24):
    """`n` smooth random color PNGs (blobs on white) in `d`."""
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        a = np.full((size, size, 3), 255.0)
        for _ in range(3):
            cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 8)
            m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            a = a * (1 - m) + m * rng.uniform(0, 255, 3)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return d


def write_speech_folder(d, n: int, seed: int = 0, sample_rate: int = 16000):
    """`n` speech-like WAVs (harmonic chirps with an envelope, 0.3 to 0.85 s) in `d`."""
    import numpy as np
    import soundfile as sf

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        t = np.arange(int(sample_rate * (0.3 + 0.05 * (i % 12)))) / sample_rate
        f = 140.0 * (1 + 0.3 * np.sin(2 * np.pi * 1.5 * t + i))
        ph = 2 * np.pi * np.cumsum(f) / sample_rate
        w = sum(np.sin(k * ph) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
        w = 0.3 * w / np.abs(w).max() + 0.01 * rng.standard_normal(len(t))
        sf.write(d / f"clip_{i:02d}.wav", w.astype(np.float32), sample_rate, subtype="PCM_16")
    return d


def codec_train_argv(kind: str, data, out, *extra: str) -> list[str]:
    """`tessera tokenizer train KIND` on CPU with the micro settings; `extra` are more flags."""
    sets = [a for s in CODEC_MICRO[kind] for a in ("--set", s)]
    return ["tokenizer", "train", kind, "--data", str(data), "--out", str(out), "--no-progress", "--device", "cpu",
            *sets, *extra]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc). torchrun starts its workers in sessions of their own, so
    killing its process group would leave them running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def kill_when(cmd, ready, env=None) -> None:
    """Start `cmd`, and SIGKILL it and every process it started as soon as `ready()` is true (whatever they
    are doing then), as the out-of-memory killer or a lost node would."""
    import contextlib
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = [proc.pid]
    try:
        deadline = time.monotonic() + 600
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "not ready after 600 s"
            time.sleep(0.002)
        tree = process_tree(proc.pid)
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
    finally:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while not all(gone(pid) for pid in tree[1:]):
        assert time.monotonic() < deadline, "a killed worker is still running"
        time.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL


def free_port() -> int:
    """A port no one listens on now: a fixed one could meet another job's rendezvous on a shared machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` local processes, on a free port."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]


def run_torchrun(module_argv: list[str], nproc: int = 2, timeout: float = 600):
    """`python -m torch.distributed.run ... -m MODULE ARGS` with one thread per process; fails the test (with
    the end of stderr) unless every process exits cleanly."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([*torchrun_argv(nproc), "-m", *module_argv], env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def interrupt_shard_writes(monkeypatch, at: int = 3):
    """Make pretokenize's `at`-th shard write raise KeyboardInterrupt, as Ctrl-C would; returns a function
    that puts the real writer back."""
    from tessera.train import pretokenize as pt

    real, calls = pt.write_shard, {"n": 0}

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pt, "write_shard", crash)
    return lambda: monkeypatch.setattr(pt, "write_shard", real)



class ScriptedJudge:
    """A `MediaJudge` that predicts one fixed label for every item and knows the labels of the files it is
    given: what the codec evaluations need of a judge, without training one."""

    source = "the scripted labels"

    def __init__(self, labels: dict, predicted: int = 0):
        self.labels = {Path(p).resolve(): label for p, label in labels.items()}
        self.predicted, self.seen = predicted, []

    def label(self, path):
        return self.labels.get(Path(path).resolve())

    def predict(self, media, **kwargs):
        self.seen.append((len(media), kwargs))
        return [self.predicted] * len(media)


HF_WORDS = ["seven", "eight", "digit", "a", "the", "drawing", "of", "is", "what", "this", "written", "number",
            "café", "naïve", "日本語", "テキスト", "emoji", "😀", "Съешь", "булок", "1234", "tabs\tand", "new\nline"]


def make_hf_tokenizer(out, style: str = "llama", vocab_size: int = 400, seed: int = 0):
    """Train a tiny byte-level BPE with the `tokenizers` library and save it as a transformers tokenizer folder.

    style "llama": <unk> <s> </s> at ids 0, 1, 2, bos <s>, eos </s> (Llama's special tokens); "qwen": no BOS,
    <|endoftext|> <|im_start|> <|im_end|> added after the vocabulary, eos <|endoftext|> (Qwen's)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(HF_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"] if style == "llama" else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    if style == "llama":
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
            chat_template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    hf.save_pretrained(out)
    return hf


def hf_model(kind, out, vocab, *, tie=False, shard=False, **extra):
    """A tiny transformers model with non-trivial norms and biases, saved as safetensors; returns the model."""
    import transformers

    cls = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    config = getattr(transformers, f"{cls}Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=50000.0,
        tie_word_embeddings=tie, **({"head_dim": 16} if kind == "qwen3" else {}), **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True, **({"max_shard_size": "40KB"} if shard else {}))
    return model
