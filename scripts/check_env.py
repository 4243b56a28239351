"""Check that the native pieces tessera needs load and work, and say what to do when one does not.

Run by scripts/setup.sh after installing; exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
import traceback


def _torch() -> str:
    import torch

    x = torch.randn(4, 8)
    assert torch.isfinite(x @ x.T).all()
    return f"torch {torch.__version__}"


def _torchaudio() -> str:
    import torch
    import torchaudio

    wave = torch.sin(torch.linspace(0, 440 * 6.283, 16000)).unsqueeze(0)
    resampled = torchaudio.functional.resample(wave, 16000, 24000)
    assert resampled.shape[-1] == 24000
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, n_mels=40)(wave)
    assert mel.shape[1] == 40 and torch.isfinite(mel).all()
    return f"torchaudio {torchaudio.__version__} (resample, mel)"


def _sentencepiece() -> str:
    import sentencepiece

    sentencepiece.SentencePieceProcessor()
    return f"sentencepiece {sentencepiece.__version__}"


def _vector_quantize() -> str:
    import torch
    from vector_quantize_pytorch import FSQ

    codes = FSQ(levels=[8, 5, 5])(torch.randn(1, 4, 3))[1]
    assert codes.shape == (1, 4)
    return "vector-quantize-pytorch (FSQ)"


def _soundfile() -> str:
    import io

    import numpy as np
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(160, dtype=np.float32), 16000, format="WAV")
    buf.seek(0)
    data, rate = soundfile.read(buf)
    assert rate == 16000 and len(data) == 160
    return f"soundfile {soundfile.__version__} (libsndfile {soundfile.__libsndfile_version__})"


CHECKS = {
    "torch": _torch,
    "torchaudio": _torchaudio,
    "sentencepiece": _sentencepiece,
    "vector-quantize-pytorch": _vector_quantize,
    "soundfile": _soundfile,
}

HINTS = {
    "torchaudio": "torch and torchaudio must be the same exact release (see pyproject.toml); "
    "an 'undefined symbol' error means they are not.",
    "soundfile": "soundfile needs libsndfile; its wheel ships one, a distribution package may not.",
}


def main() -> int:
    for name, check in CHECKS.items():
        try:
            what = check()
        except Exception:  # noqa: BLE001 - any failure is reported with its traceback
            print(f"environment check failed: {name}", file=sys.stderr)
            traceback.print_exc()
            if name in HINTS:
                print(f"hint: {HINTS[name]}", file=sys.stderr)
            return 1
        print(f"ok  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
