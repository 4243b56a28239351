"""The audio codec on spoken digits (slow): train the tiny preset on the digits corpus for a few minutes,
then a speech-digit judge trained on the real clips must recognize the held-out voices' reconstructions
with at least 90% of its accuracy on their originals. TESSERA_AUDIO_MINUTES sets the budget (default 10)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_tiny_codec_keeps_spoken_digits_intelligible(tmp_path, capsys):
    from tessera.cli import main
    from tessera.data.digits import build_digits_corpus

    corpus = tmp_path / "digits"
    build_digits_corpus(corpus)
    minutes = os.environ.get("TESSERA_AUDIO_MINUTES", "10")
    out = tmp_path / "codec"
    assert main(["tokenizer", "train", "audio", "--data", str(corpus / "speech" / "train"), "--eval-data",
                 str(corpus / "speech" / "test"), "--out", str(out), "--preset", "tiny", "--max-minutes", minutes,
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "eval", "audio", "--codec", str(out), "--data", str(corpus / "speech" / "test"),
                 "--digits-corpus", str(corpus), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["judge"]["accuracy_original"] >= 0.95
    assert res["judge"]["ratio"] >= 0.9, res
