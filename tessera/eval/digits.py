"""The tri-modal digits corpus, built offline: handwritten digit images, spoken digit words, and text.

- images: scikit-learn's bundled handwritten digits (1,797 images, 8x8, 17 gray levels), upscaled to
  `image_size` as dark ink on white. Every `test_every`-th image is held out.
- speech: the ten digit words spoken by espeak-ng over several voices and voice variants, each clip at a
  random speed and pitch, trimmed of silence and resampled to 16 kHz. The test split uses voices *and*
  variants that never occur in training.
- text: templates ("a drawing of the digit seven", "7", "seven", "what digit is this? seven", ...).

    corpus/
      images/{train,test}/NNNN.png      speech/{train,test}/VOICE_VARIANT_DIGIT_K.wav
      documents.jsonl                   training documents (DESIGN.md format), all directions mixed
      test_documents.jsonl              the same directions over held-out images and voices
      text.txt                          text for the text tokenizer
      meta.json                         labels, splits, voices, counts, the config

Documents mix: image->text (captioning), text->image (drawing), speech->text (transcribing),
text->speech (speaking), speech->image, image->speech, and plain text.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tessera.errors import TesseraError
from tessera.storage import atomic_write_json, atomic_write_text, read_json
from tessera.train.monitor import progress_bar

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEECH_RATE = 16000
CORPUS_VERSION = 1

CAPTIONS = ("a drawing of the digit {w}", "the digit {w}", "{w}", "{d}", "what digit is this? {w}",
            "this is a {w}", "a handwritten {d}")
DRAW_PROMPTS = ("draw {w}", "a drawing of the digit {w}", "draw the digit {d}", "{w}", "{d}")
TRANSCRIPTS = ("{w}", "{d}", "the word {w}", "someone says {w}")
SPEAK_PROMPTS = ("say {w}", "say the number {d}", "speak: {w}")
PLAIN_TEXT = ("{w} is written {d}", "the number after {p} is {w}", "{w} comes before {n}", "{d} is {w}",
              "count: {w}", "{w} plus zero is {w}")


class CorpusError(TesseraError):
    pass


@dataclass
class DigitsConfig:
    image_size: int = 32
    test_every: int = 6  # every 6th image is held out (~300 of 1797)
    train_voices: list[str] = field(default_factory=lambda: [
        "en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-gb-x-gbcwmd"])
    train_variants: list[str] = field(default_factory=lambda: ["", "m1", "m3", "f1", "f2", "f5"])
    test_voices: list[str] = field(default_factory=lambda: ["en-us-nyc", "en-gb-x-gbclan"])
    test_variants: list[str] = field(default_factory=lambda: ["m2", "f3"])
    takes_per_voice: int = 3  # clips per (voice, variant, digit), each at its own speed and pitch
    test_takes_per_voice: int = 2
    speed_range: tuple[int, int] = (130, 190)  # words per minute
    pitch_range: tuple[int, int] = (25, 75)
    max_images: int = 0  # 0: all 1,797
    plain_text_docs: int = 600
    seed: int = 0

    @classmethod
    def fast(cls) -> "DigitsConfig":
        """A cut-down corpus for tests: fewer images, voices and takes."""
        return cls(train_voices=["en-us", "en-gb"], train_variants=["", "f2"], test_voices=["en-us-nyc"],
                   test_variants=["m2"], takes_per_voice=2, test_takes_per_voice=1, max_images=400,
                   plain_text_docs=100)


def check_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise CorpusError(
            "espeak-ng is not installed; the digits corpus speaks its words with it. "
            "Install it with: sudo apt-get install -y espeak-ng   (or run: bash scripts/setup.sh)"
        )
    return exe


def digit_image(pixels8: np.ndarray, size: int) -> Image.Image:
    """An 8x8 digit (0..16, ink high) as a `size` x `size` grayscale image, dark ink on white."""
    a = (255.0 * (1.0 - pixels8.astype(np.float32) / 16.0)).astype(np.uint8)
    return Image.fromarray(a, mode="L").resize((size, size), Image.Resampling.BILINEAR)


def _trim(w: np.ndarray, sr: int, threshold: float = 0.01, pad_s: float = 0.04) -> np.ndarray:
    idx = np.nonzero(np.abs(w) > threshold)[0]
    if idx.size == 0:
        return w
    pad = int(pad_s * sr)
    return w[max(0, idx[0] - pad): idx[-1] + pad]


def speak(word: str, voice: str, variant: str, speed: int, pitch: int, out: Path, exe: str) -> float:
    """Synthesize `word` with espeak-ng, trim silence, resample to 16 kHz; returns the duration."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    v = f"{voice}+{variant}" if variant else voice
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        r = subprocess.run([exe, "-v", v, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, word],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise CorpusError(f"espeak-ng failed for voice {v!r}: {r.stderr.strip()}")
        w, sr = sf.read(tmp.name, dtype="float32")
    if w.ndim > 1:
        w = w.mean(1)
    w = _trim(w, sr)
    w = AF.resample(torch.from_numpy(np.ascontiguousarray(w)), sr, SPEECH_RATE).numpy()
    w = 0.9 * w / max(1e-6, float(np.abs(w).max()))  # voices differ in loudness; normalize the peak
    sf.write(str(out), w, SPEECH_RATE, subtype="PCM_16")
    return len(w) / SPEECH_RATE


def _fmt(template: str, d: int) -> str:
    return template.format(w=DIGIT_WORDS[d], d=d, p=DIGIT_WORDS[(d - 1) % 10], n=DIGIT_WORDS[(d + 1) % 10])


def _documents(images: list[tuple[str, int]], clips: list[tuple[str, int]], rng: random.Random,
               plain_docs: int) -> list[dict]:
    by_digit_img: dict[int, list[str]] = {d: [] for d in range(10)}
    by_digit_clip: dict[int, list[str]] = {d: [] for d in range(10)}
    for p, d in images:
        by_digit_img[d].append(p)
    for p, d in clips:
        by_digit_clip[d].append(p)
    docs = []
    for p, d in images:
        docs.append({"segments": [{"image": p}, {"text": _fmt(rng.choice(CAPTIONS), d)}], "source": "caption",
                     "label": d})
        docs.append({"segments": [{"text": _fmt(rng.choice(DRAW_PROMPTS), d)}, {"image": p}], "source": "draw",
                     "label": d})
    for p, d in clips:
        docs.append({"segments": [{"audio": p}, {"text": _fmt(rng.choice(TRANSCRIPTS), d)}],
                     "source": "transcribe", "label": d})
        docs.append({"segments": [{"text": _fmt(rng.choice(SPEAK_PROMPTS), d)}, {"audio": p}], "source": "speak",
                     "label": d})
        if by_digit_img[d]:
            docs.append({"segments": [{"audio": p}, {"image": rng.choice(by_digit_img[d])}],
                         "source": "speech_to_image", "label": d})
    for p, d in images[::2]:
        if by_digit_clip[d]:
            docs.append({"segments": [{"image": p}, {"audio": rng.choice(by_digit_clip[d])}],
                         "source": "image_to_speech", "label": d})
    for _ in range(plain_docs):
        d = rng.randrange(10)
        docs.append({"segments": [{"text": _fmt(rng.choice(PLAIN_TEXT), d)}], "source": "text", "label": d})
    rng.shuffle(docs)
    return docs


def build_digits_corpus(out: str | Path, config: DigitsConfig | None = None, force: bool = False,
                        progress: bool = True) -> dict:
    """Build the corpus into `out`; an existing complete corpus with the same config is reused."""
    from sklearn.datasets import load_digits
    
    cfg = config or DigitsConfig()
    out = Path(out)
    meta_path = out / "meta.json"
    if meta_path.exists() and not force:
        meta = read_json(meta_path)
        if meta.get("config") == json.loads(json.dumps(asdict(cfg))) and meta.get("version") == CORPUS_VERSION:
            return meta
        raise CorpusError(f"{out} holds a digits corpus built with another config; pass --force to rebuild it")
    exe = check_espeak()
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    for sub in ("images/train", "images/test", "speech/train", "speech/test"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)

    # ---- images
    digits = load_digits()
    n = len(digits.images) if not cfg.max_images else min(cfg.max_images, len(digits.images))
    split_images: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for i in range(n):
        split = "test" if i % cfg.test_every == cfg.test_every - 1 else "train"
        rel = f"images/{split}/{i:04d}.png"
        digit_image(digits.images[i], cfg.image_size).save(out / rel)
        split_images[split].append((rel, int(digits.target[i])))

    # ---- speech
    jobs = []
    for split, voices, variants, takes in (
        ("train", cfg.train_voices, cfg.train_variants, cfg.takes_per_voice),
        ("test", cfg.test_voices, cfg.test_variants, cfg.test_takes_per_voice),
    ):
        for voice in voices:
            for variant in variants:
                for d in range(10):
                    for k in range(takes):
                        speed, pitch = rng.randint(*cfg.speed_range), rng.randint(*cfg.pitch_range)
                        rel = f"speech/{split}/{voice}_{variant or 'default'}_{d}_{k}.wav"
                        jobs.append((split, rel, d, voice, variant, speed, pitch))
    split_clips: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    durations = []
    with ThreadPoolExecutor(max_workers=4) as pool, progress_bar(total=len(jobs), desc="espeak-ng", unit="clip",
                                                         disable=not progress) as bar:
        futures = [(j, pool.submit(speak, DIGIT_WORDS[j[2]], j[3], j[4], j[5], j[6], out / j[1], exe)) for j in jobs]
        for j, f in futures:
            durations.append(f.result())
            split_clips[j[0]].append((j[1], j[2]))
            bar.update(1)

    # ---- documents and text
    train_docs = _documents(split_images["train"], split_clips["train"], rng, cfg.plain_text_docs)
    test_docs = _documents(split_images["test"], split_clips["test"], rng, cfg.plain_text_docs // 5)
    for name, docs in (("documents.jsonl", train_docs), ("test_documents.jsonl", test_docs)):
        atomic_write_text(out / name, "".join(json.dumps(d) + "\n" for d in docs))
    lines = sorted({_fmt(t, d) for t in CAPTIONS + DRAW_PROMPTS + TRANSCRIPTS + SPEAK_PROMPTS + PLAIN_TEXT
                    for d in range(10)})
    atomic_write_text(out / "text.txt", "\n".join(lines * 20) + "\n")
    sources: dict[str, int] = {}
    for d in train_docs:
        sources[d["source"]] = sources.get(d["source"], 0) + 1
    meta = {
        "version": CORPUS_VERSION,
        "config": json.loads(json.dumps(asdict(cfg))),
        "images": {k: [{"path": p, "label": d} for p, d in v] for k, v in split_images.items()},
        "speech": {k: [{"path": p, "label": d} for p, d in v] for k, v in split_clips.items()},
        "counts": {
            "images": {k: len(v) for k, v in split_images.items()},
            "speech": {k: len(v) for k, v in split_clips.items()},
            "documents": len(train_docs),
            "test_documents": len(test_docs),
            "sources": sources,
            "speech_seconds": round(float(sum(durations)), 1),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(meta_path, meta)  # written last: its presence marks a complete corpus
    return meta


def load_meta(corpus: str | Path) -> dict:
    p = Path(corpus) / "meta.json"
    if not p.is_file():
        raise CorpusError(f"{corpus} is not a digits corpus (no meta.json); build one with `tessera data digits`")
    return read_json(p)


# ------------------------------------------------------------------------------------------------ CLI
def add_build_arguments(p) -> None:
    p.add_argument("--out", required=True, help="corpus directory")
    p.add_argument("--image-size", type=int, default=DigitsConfig.image_size)
    p.add_argument("--fast", action="store_true", help="a cut-down corpus (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")


def run_build(args) -> int:
    cfg = DigitsConfig.fast() if args.fast else DigitsConfig()
    cfg.image_size, cfg.seed = args.image_size, args.seed
    meta = build_digits_corpus(args.out, cfg, force=args.force)
    c = meta["counts"]
    print(f"digits corpus -> {args.out}: images {c['images']}, speech clips {c['speech']} "
          f"({c['speech_seconds']} s), {c['documents']} training documents, {c['test_documents']} test documents")
    return 0
