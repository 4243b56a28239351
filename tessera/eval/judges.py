"""Judges: small classifiers, trained on real data only, that score generated or reconstructed media.

`SpeechDigitJudge` recognizes the spoken digit words of the digits corpus. It computes MFCCs (torchaudio),
subtracts each coefficient's mean over the clip (cepstral mean normalization: a fixed coloration of the
spectrum, from a voice, a microphone or a codec, is a constant offset in the cepstrum, and this removes
it), pools them over time (the mean over 8 equal segments, plus the standard deviation over the whole
clip, so the feature keeps the coarse order of the phonemes but not their exact timing) and fits a
StandardScaler + RBF SVC (scikit-learn). Trained on the corpus's real training clips, it recognizes the
held-out voices' original clips perfectly, so its accuracy on codec reconstructions or generated speech
measures how intelligible they are. Without the mean normalization the same classifier also scores 100%
on the originals but only 74% on Opus at 6 kbps: it would judge the coloration, not the words.

    judge = SpeechDigitJudge.from_corpus("corpus/")
    judge.accuracy(waves, labels, sample_rate=16000)   # waves: list of 1-D arrays

`CorpusJudge` is a digits judge together with its corpus's labels, trained when first used: what the codec
evaluations take (`tessera.unimodal.protocol.MediaJudge`) when `--digits-corpus` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from tessera.errors import TesseraError
from tessera.storage import read_json
from tessera.unimodal.protocol import judge_accuracy

JUDGE_RATE = 16000


class JudgeError(TesseraError):
    pass


def corpus_split(corpus: str | Path, kind: str, split: str, augmented: bool = False) -> list[tuple[Path, int]]:
    """(path, digit) pairs of a digits corpus's `kind` ("images" or "speech") `split` ("train" or "test"),
    from its meta.json; files made by augmentation only with `augmented` (judges learn from real data)."""
    root = Path(corpus)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise JudgeError(f"{root} is not a digits corpus: meta.json is missing (build one with `tessera data digits`)")
    meta = read_json(meta_path)
    try:
        return [(root / e["path"], int(e["label"])) for e in meta[kind][split]
                if augmented or not e.get("augmented")]
    except (KeyError, TypeError) as e:
        raise JudgeError(f"{meta_path}: no {kind}/{split} entries ({e})") from None


def corpus_speech(corpus: str | Path, split: str) -> list[tuple[Path, int]]:
    """(path, digit) pairs of the digits corpus's speech split ("train" or "test")."""
    return corpus_split(corpus, "speech", split)


class SpeechDigitJudge:
    def __init__(self, n_mfcc: int = 20, segments: int = 8, C: float = 10.0, seed: int = 0):
        import torchaudio

        self.n_mfcc, self.segments = n_mfcc, segments
        self.mfcc = torchaudio.transforms.MFCC(
            sample_rate=JUDGE_RATE, n_mfcc=n_mfcc,
            melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 40, "pad_mode": "constant"})
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        self.model = make_pipeline(StandardScaler(), SVC(C=C, gamma="scale", random_state=seed))
        self.fitted = False

    # ---------------------------------------------------------------------------------- features
    def features(self, wave, sample_rate: int = JUDGE_RATE) -> np.ndarray:
        """One clip (1-D array or tensor, any rate) -> pooled MFCC vector (n_mfcc * (segments + 1),)."""
        w = torch.as_tensor(np.asarray(wave, dtype=np.float32)).flatten()
        if sample_rate != JUDGE_RATE:
            import torchaudio.functional as AF

            w = AF.resample(w, sample_rate, JUDGE_RATE)
        if w.numel() < 400:
            w = torch.nn.functional.pad(w, (0, 400 - w.numel()))
        with torch.no_grad():
            m = self.mfcc(w)  # (n_mfcc, frames)
        m = m - m.mean(-1, keepdim=True)  # cepstral mean normalization
        parts = [seg.mean(-1) for seg in torch.tensor_split(m, self.segments, dim=-1) if seg.shape[-1]]
        while len(parts) < self.segments:  # clips shorter than `segments` frames
            parts.append(parts[-1])
        return torch.cat(parts + [m.std(-1, unbiased=False)]).numpy()

    def _matrix(self, waves, sample_rate) -> np.ndarray:
        return np.stack([self.features(w, sample_rate) for w in waves])

    # --------------------------------------------------------------------------------------- fit
    def fit(self, waves, labels, sample_rate: int = JUDGE_RATE) -> SpeechDigitJudge:
        if len(waves) == 0:
            raise JudgeError("no clips to train the speech judge on")
        self.model.fit(self._matrix(waves, sample_rate), np.asarray(labels))
        self.fitted = True
        return self

    def predict(self, waves, sample_rate: int = JUDGE_RATE) -> np.ndarray:
        if not self.fitted:
            raise JudgeError("the speech judge is not trained yet")
        return self.model.predict(self._matrix(waves, sample_rate))

    def accuracy(self, waves, labels, sample_rate: int = JUDGE_RATE) -> float:
        return judge_accuracy(self, waves, labels, sample_rate=sample_rate)

    @classmethod
    def from_corpus(cls, corpus: str | Path, **kwargs) -> SpeechDigitJudge:
        """Train on the corpus's real training clips (never on generated or reconstructed audio)."""
        import soundfile as sf

        pairs = corpus_speech(corpus, "train")
        waves, labels = [], []
        for path, label in pairs:
            w, sr = sf.read(str(path), dtype="float32", always_2d=True)
            waves.append(_at_rate(w.mean(1), sr))
            labels.append(label)
        return cls(**kwargs).fit(waves, labels)


def _at_rate(w: np.ndarray, sr: int) -> np.ndarray:
    if sr == JUDGE_RATE:
        return w
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(w)), sr, JUDGE_RATE).numpy()


def corpus_images(corpus: str | Path, split: str) -> list[tuple[Path, int]]:
    """(path, digit) pairs of the digits corpus's image split ("train" or "test")."""
    return corpus_split(corpus, "images", split)


class ImageDigitJudge:
    """Recognizes handwritten digits in images of any size: grayscale, 16x16, StandardScaler + RBF SVC.

    Trained on the corpus's real training images only (never on generated or reconstructed ones), so its
    verdict on a generated image says whether the image looks like that digit to an independent reader.
    """

    size = 16

    def __init__(self, C: float = 10.0, seed: int = 0):
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        self.model = make_pipeline(StandardScaler(), SVC(C=C, gamma="scale", random_state=seed))
        self.fitted = False

    def features(self, image) -> np.ndarray:
        from PIL import Image

        im = image.convert("L").resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float32).reshape(-1) / 255.0

    def fit(self, images, labels) -> ImageDigitJudge:
        if len(images) == 0:
            raise JudgeError("no images to train the image judge on")
        self.model.fit(np.stack([self.features(im) for im in images]), np.asarray(labels))
        self.fitted = True
        return self

    def predict(self, images) -> np.ndarray:
        if not self.fitted:
            raise JudgeError("the image judge is not trained yet")
        return self.model.predict(np.stack([self.features(im) for im in images]))

    def accuracy(self, images, labels) -> float:
        return judge_accuracy(self, images, labels)

    @staticmethod
    def _load(pairs):
        from tessera.unimodal.media import load_image

        return [load_image(p) for p, _ in pairs], [label for _, label in pairs]

    @classmethod
    def from_corpus(cls, corpus: str | Path, **kwargs) -> ImageDigitJudge:
        """Train on the corpus's real training images."""
        images, labels = cls._load(corpus_images(corpus, "train"))
        return cls(**kwargs).fit(images, labels)

    def heldout_accuracy(self, corpus: str | Path) -> float:
        """Accuracy on the corpus's real held-out images."""
        images, labels = self._load(corpus_images(corpus, "test"))
        return self.accuracy(images, labels)


class CorpusJudge:
    """The digits corpus's image or speech judge with the corpus's labels (`MediaJudge`): `label` looks a file
    up in meta.json (both splits); the judge is trained on the real training files when it first predicts."""

    JUDGES: ClassVar[dict] = {"images": ImageDigitJudge, "speech": SpeechDigitJudge}

    def __init__(self, corpus: str | Path, kind: str):
        if kind not in self.JUDGES:
            raise ValueError(f"kind must be images or speech, got {kind!r}")
        self.corpus, self.kind = corpus, kind
        self.source = f"{corpus}/meta.json"
        self.labels = {p.resolve(): label for p, label in corpus_split(corpus, kind, "train")}
        try:
            self.labels.update({p.resolve(): label for p, label in corpus_split(corpus, kind, "test")})
        except JudgeError:  # a corpus without a test split still labels its training files
            pass
        self._judge = None

    def label(self, path: str | Path) -> int | None:
        return self.labels.get(Path(path).resolve())

    def predict(self, media, **kwargs) -> np.ndarray:
        if self._judge is None:
            self._judge = self.JUDGES[self.kind].from_corpus(self.corpus)
        return self._judge.predict(media, **kwargs)
