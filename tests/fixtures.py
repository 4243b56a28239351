"""Deterministic codecs that implement the codec protocol with arithmetic instead of networks.

They let the span logic of the multimodal tokenizer be tested exactly: `encode(decode(codes)) == codes`.
"""

from __future__ import annotations

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

    from tessera.train import monitor

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
    monkeypatch.setattr(monitor, "time", types.SimpleNamespace(
        monotonic=lambda: seconds_per_step * steps["n"], time=time.time, strftime=time.strftime, gmtime=time.gmtime))
    return steps, bars
