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
      conversations.jsonl               the training documents as user/assistant turns (instruction tuning)
      test_conversations.jsonl          the same over held-out images and voices
      text.txt                          text for the text tokenizer
      meta.json                         labels, splits, voices, counts, the config

Documents mix: image->text (captioning), text->image (drawing), speech->text (transcribing),
text->speech (speaking), speech->image, image->speech, and plain text.
"""

from __future__ import annotations

import argparse
import json
import math
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
from tessera.runtime.monitor import progress_bar

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEECH_RATE = 16000
CORPUS_VERSION = 2
BUILD_MARKER = ".building"  # present while a build runs: the directory is a corpus in the making

CAPTIONS = ("a drawing of the digit {w}", "the digit {w}", "{w}", "{d}", "what digit is this? {w}",
            "this is a {w}", "a handwritten {d}")
DRAW_PROMPTS = ("draw {w}", "a drawing of the digit {w}", "draw the digit {d}", "{w}", "{d}")
TRANSCRIPTS = ("{w}", "{d}", "the word {w}", "someone says {w}")
SPEAK_PROMPTS = ("say {w}", "say the number {d}", "speak: {w}")
PLAIN_TEXT = ("{w} is written {d}", "the number after {p} is {w}", "{w} comes before {n}", "{d} is {w}",
              "count: {w}", "{w} plus zero is {w}")
# What a user asks in a conversation (conversations.jsonl), per source; "" asks nothing beyond the input.
QUESTIONS = {"caption": ("what digit is this?", "what is this?", ""), "transcribe": ("what did they say?", ""),
             "speech_to_image": ("draw what you hear", ""), "image_to_speech": ("say what you see", "")}


class CorpusError(TesseraError):
    pass


@dataclass
class DigitsConfig:
    image_size: int = 32
    test_every: int = 6  # every 6th image is held out (~300 of 1797)
    train_voices: list[str] = field(default_factory=lambda: [
        "en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-gb-x-gbcwmd"])
    # Speaker variety is what lets a model understand voices it never heard: twelve training variants.
    train_variants: list[str] = field(default_factory=lambda: ["", "m1", "m3", "m4", "m5", "m6", "m7", "f1", "f2",
                                                               "f4", "f5", "klatt"])
    test_voices: list[str] = field(default_factory=lambda: ["en-us-nyc", "en-gb-x-gbclan"])
    test_variants: list[str] = field(default_factory=lambda: ["m2", "f3"])
    takes_per_voice: int = 3  # clips per (voice, variant, digit), each at its own speed and pitch
    test_takes_per_voice: int = 4  # 160 held-out clips: one clip is 0.00625 of a speech task's accuracy
    speed_range: tuple[int, int] = (130, 190)  # words per minute
    pitch_range: tuple[int, int] = (25, 75)
    max_images: int = 0  # 0: all 1,797
    plain_text_docs: int = 600
    # Variety at no download cost (training split only; held-out images and clips stay as they are):
    image_augment: int = 0  # extra variants of each training image: a small random affine warp and stroke width
    speech_augment: int = 0  # extra takes per training (voice, variant, digit), at a random gain, some with noise
    speech_image_pairs: int = 1  # speech->image documents per training clip, each with its own random image
    # Speech->image documents write what was said between the clip and the image (clip, transcript, image), so
    # a model can answer in the order of SpeechGPT's chain of modality: hear, write the words, then draw them.
    speech_image_transcript: bool = True
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


def augment_image(im: Image.Image, rng: random.Random) -> Image.Image:
    """A variant of a grayscale image with dark ink on white: rotation up to 12 degrees, scale 0.9-1.1, shear
    up to 0.15, a shift of up to 1/16 of the side, then thicker, thinner or unchanged strokes."""
    w, h = im.size
    a = math.radians(rng.uniform(-12, 12))
    s = rng.uniform(0.9, 1.1)
    sh = rng.uniform(-0.15, 0.15)
    tx, ty = rng.uniform(-w / 16, w / 16), rng.uniform(-h / 16, h / 16)
    # The inverse map (output pixel -> input pixel) about the centre, as PIL's AFFINE transform wants it.
    c, si = math.cos(a) / s, math.sin(a) / s
    m = [c, si + sh / s, 0.0, -si, c, 0.0]
    cx, cy = w / 2, h / 2
    m[2] = cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] = cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    out = im.transform((w, h), Image.Transform.AFFINE, m, resample=Image.Resampling.BILINEAR, fillcolor=255)
    stroke = rng.choice(("thick", "thin", "same"))
    if stroke != "same":
        from PIL import ImageFilter

        f = ImageFilter.MinFilter(3) if stroke == "thick" else ImageFilter.MaxFilter(3)
        out = Image.blend(out, out.filter(f), 0.5)
    return out


def augment_speech(w: np.ndarray, rng: random.Random) -> np.ndarray:
    """A clip at a random gain (-12 to 0 dB from its peak level), with light white noise (SNR 20-35 dB) half of
    the time."""
    g = 10 ** (rng.uniform(-12, 0) / 20)
    w = w * g
    if rng.random() < 0.5:
        snr = rng.uniform(20, 35)
        power = float(np.mean(w ** 2)) + 1e-12
        noise = np.random.default_rng(rng.randrange(2**32)).standard_normal(len(w)).astype(np.float32)
        w = w + noise * np.sqrt(power / 10 ** (snr / 10))
    return np.clip(w, -1, 1).astype(np.float32)


def _trim(w: np.ndarray, sr: int, threshold: float = 0.01, pad_s: float = 0.04) -> np.ndarray:
    idx = np.nonzero(np.abs(w) > threshold)[0]
    if idx.size == 0:
        return w
    pad = int(pad_s * sr)
    return w[max(0, idx[0] - pad): idx[-1] + pad]


def speak(word: str, voice: str, variant: str, speed: int, pitch: int, out: Path, exe: str,
          augment_seed: int | None = None) -> float:
    """Synthesize `word` with espeak-ng, trim silence, resample to 16 kHz; returns the duration. With
    `augment_seed`, the clip is saved through `augment_speech` with that seed."""
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
    if augment_seed is not None:
        w = augment_speech(w, random.Random(augment_seed))
    sf.write(str(out), w, SPEECH_RATE, subtype="PCM_16")
    return len(w) / SPEECH_RATE


def _fmt(template: str, d: int) -> str:
    return template.format(w=DIGIT_WORDS[d], d=d, p=DIGIT_WORDS[(d - 1) % 10], n=DIGIT_WORDS[(d + 1) % 10])


def _documents(images: list[tuple[str, int]], clips: list[tuple[str, int]], rng: random.Random,
               plain_docs: int, speech_image_pairs: int = 1, source_of: dict[str, str] | None = None,
               augmented: set[str] | None = None, speech_image_transcript: bool = False) -> list[dict]:
    """The training documents. Augmented images and clips are inputs only (captioning, transcribing, the
    speech of speech->image, the image of image->speech): a model learns what it is asked to generate, so an
    output is always a real image or clip. A warped variant's drawing document draws its real source image
    (`source_of`); generated digits then look like real ones, not like the warps."""
    source_of, augmented = source_of or {}, augmented or set()
    real_img: dict[int, list[str]] = {d: [] for d in range(10)}
    real_clip: dict[int, list[str]] = {d: [] for d in range(10)}
    for p, d in images:
        if p not in augmented:
            real_img[d].append(p)
    for p, d in clips:
        if p not in augmented:
            real_clip[d].append(p)
    docs = []
    for p, d in images:
        docs.append({"segments": [{"image": p}, {"text": _fmt(rng.choice(CAPTIONS), d)}], "source": "caption",
                     "label": d})
        docs.append({"segments": [{"text": _fmt(rng.choice(DRAW_PROMPTS), d)}, {"image": source_of.get(p, p)}],
                     "source": "draw", "label": d})
    for p, d in clips:
        docs.append({"segments": [{"audio": p}, {"text": _fmt(rng.choice(TRANSCRIPTS), d)}],
                     "source": "transcribe", "label": d})
        spoken = p if p not in augmented or not real_clip[d] else rng.choice(real_clip[d])
        docs.append({"segments": [{"text": _fmt(rng.choice(SPEAK_PROMPTS), d)}, {"audio": spoken}], "source": "speak",
                     "label": d})
        for _ in range(speech_image_pairs if real_img[d] else 0):
            said = [{"text": _fmt(rng.choice(TRANSCRIPTS), d)}] if speech_image_transcript else []
            docs.append({"segments": [{"audio": p}, *said, {"image": rng.choice(real_img[d])}],
                         "source": "speech_to_image", "label": d})
    for p, d in images[::2]:
        if real_clip[d]:
            docs.append({"segments": [{"image": p}, {"audio": rng.choice(real_clip[d])}],
                         "source": "image_to_speech", "label": d})
    for _ in range(plain_docs):
        d = rng.randrange(10)
        docs.append({"segments": [{"text": _fmt(rng.choice(PLAIN_TEXT), d)}], "source": "text", "label": d})
    rng.shuffle(docs)
    return docs


def to_conversation(doc: dict, rng: random.Random) -> dict | None:
    """A two-sided document as one user turn (its first segment, and a question for some sources) and one
    assistant turn (the rest): the instruction-tuning form of the same pairing. Plain text has none."""
    if doc["source"] == "text":
        return None
    ask = rng.choice(QUESTIONS.get(doc["source"], ("",)))
    user = doc["segments"][:1] + ([{"text": ask}] if ask else [])
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": doc["segments"][1:]}],
            "source": doc["source"], "label": doc["label"]}


def _entry(path: str, label: int, augmented: set[str]) -> dict:
    return {"path": path, "label": label, **({"augmented": True} if path in augmented else {})}


def build_digits_corpus(out: str | Path, config: DigitsConfig | None = None, force: bool = False,
                        progress: bool = True) -> dict:
    """Build the corpus into `out`; an existing complete corpus with the same config is reused.

    `out` is replaced only when it is a digits corpus (complete, or a build that was interrupted); a
    non-empty directory of anything else is refused unless `force`, which names it as disposable.
    """
    from sklearn.datasets import load_digits

    cfg = config or DigitsConfig()
    out = Path(out)
    meta_path = out / "meta.json"
    if meta_path.exists() and not force:
        meta = read_json(meta_path)
        if meta.get("config") == json.loads(json.dumps(asdict(cfg))) and meta.get("version") == CORPUS_VERSION:
            return meta
        raise CorpusError(f"{out} holds a digits corpus built with another config; pass --force to rebuild it")
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file, not a directory")
    ours = meta_path.exists() or (out / BUILD_MARKER).exists()
    if out.exists() and any(out.iterdir()) and not ours and not force:
        raise CorpusError(f"{out} is not empty and is not a digits corpus; choose another --out, or pass --force "
                          f"to delete everything in it")
    exe = check_espeak()
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / BUILD_MARKER).touch()  # marks an unfinished build as ours, so a rerun may replace it
    for sub in ("images/train", "images/test", "speech/train", "speech/test"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)

    # ---- images
    digits = load_digits()
    n = len(digits.images) if not cfg.max_images else min(cfg.max_images, len(digits.images))
    split_images: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    augmented: set[str] = set()  # made by augmentation; judges train on the real files only
    source_of: dict[str, str] = {}  # a warped image -> the real image it was made from
    for i in range(n):
        split = "test" if i % cfg.test_every == cfg.test_every - 1 else "train"
        rel = f"images/{split}/{i:04d}.png"
        im = digit_image(digits.images[i], cfg.image_size)
        im.save(out / rel)
        split_images[split].append((rel, int(digits.target[i])))
        for k in range(cfg.image_augment if split == "train" else 0):
            rel_k = f"images/{split}/{i:04d}_a{k}.png"
            augment_image(im, rng).save(out / rel_k)
            split_images[split].append((rel_k, int(digits.target[i])))
            augmented.add(rel_k)
            source_of[rel_k] = rel

    # ---- speech
    jobs = []
    for split, voices, variants, takes in (
        ("train", cfg.train_voices, cfg.train_variants, cfg.takes_per_voice),
        ("test", cfg.test_voices, cfg.test_variants, cfg.test_takes_per_voice),
    ):
        for voice in voices:
            for variant in variants:
                for d in range(10):
                    extra = cfg.speech_augment if split == "train" else 0
                    for k in range(takes + extra):
                        speed, pitch = rng.randint(*cfg.speed_range), rng.randint(*cfg.pitch_range)
                        rel = f"speech/{split}/{voice}_{variant or 'default'}_{d}_{k}.wav"
                        aug = rng.randrange(2**31) if k >= takes else None
                        if aug is not None:
                            augmented.add(rel)
                        jobs.append((split, rel, d, voice, variant, speed, pitch, aug))
    split_clips: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    durations = []
    with ThreadPoolExecutor(max_workers=4) as pool, progress_bar(total=len(jobs), desc="espeak-ng", unit="clip",
                                                         disable=not progress) as bar:
        futures = [(j, pool.submit(speak, DIGIT_WORDS[j[2]], j[3], j[4], j[5], j[6], out / j[1], exe, j[7])) for j in jobs]
        for j, f in futures:
            durations.append(f.result())
            split_clips[j[0]].append((j[1], j[2]))
            bar.update(1)

    # ---- documents and text
    train_docs = _documents(split_images["train"], split_clips["train"], rng, cfg.plain_text_docs,
                            cfg.speech_image_pairs, source_of, augmented, cfg.speech_image_transcript)
    test_docs = _documents(split_images["test"], split_clips["test"], rng, cfg.plain_text_docs // 5,
                           speech_image_transcript=cfg.speech_image_transcript)
    conversations = {name: [c for c in (to_conversation(d, rng) for d in docs) if c]
                     for name, docs in (("conversations.jsonl", train_docs), ("test_conversations.jsonl", test_docs))}
    for name, docs in (("documents.jsonl", train_docs), ("test_documents.jsonl", test_docs), *conversations.items()):
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
        "images": {k: [_entry(p, d, augmented) for p, d in v] for k, v in split_images.items()},
        "speech": {k: [_entry(p, d, augmented) for p, d in v] for k, v in split_clips.items()},
        "counts": {
            "images": {k: len(v) for k, v in split_images.items()},
            "speech": {k: len(v) for k, v in split_clips.items()},
            "documents": len(train_docs),
            "conversations": len(conversations["conversations.jsonl"]),
            "test_documents": len(test_docs),
            "sources": sources,
            "speech_seconds": round(float(sum(durations)), 1),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(meta_path, meta)  # written last: its presence marks a complete corpus
    (out / BUILD_MARKER).unlink()
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
    p.add_argument("--image-augment", type=int, default=None, metavar="N",
                   help=f"extra warped variants of each training image (default {DigitsConfig.image_augment})")
    p.add_argument("--speech-augment", type=int, default=None, metavar="N",
                   help="extra takes per training voice, variant and digit, at a random gain and some with noise "
                        f"(default {DigitsConfig.speech_augment})")
    p.add_argument("--speech-image-pairs", type=int, default=None, metavar="N",
                   help=f"speech->image documents per training clip (default {DigitsConfig.speech_image_pairs})")
    p.add_argument("--speech-image-transcript", action=argparse.BooleanOptionalAction, default=None,
                   help="write the transcript between the clip and the image in speech->image documents "
                        f"(default {'on' if DigitsConfig.speech_image_transcript else 'off'})")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if the corpus exists; replaces --out even if it holds other files")


def run_build(args) -> int:
    cfg = DigitsConfig.fast() if args.fast else DigitsConfig()
    cfg.image_size, cfg.seed = args.image_size, args.seed
    for key in ("image_augment", "speech_augment", "speech_image_pairs"):
        value = getattr(args, key)
        if value is not None:
            if value < (1 if key == "speech_image_pairs" else 0):
                raise CorpusError(f"--{key.replace('_', '-')} must be >= {1 if key == 'speech_image_pairs' else 0}")
            setattr(cfg, key, value)
    if args.speech_image_transcript is not None:
        cfg.speech_image_transcript = args.speech_image_transcript
    meta = build_digits_corpus(args.out, cfg, force=args.force)
    c = meta["counts"]
    print(f"digits corpus -> {args.out}: images {c['images']}, speech clips {c['speech']} "
          f"({c['speech_seconds']} s), {c['documents']} training documents, {c['test_documents']} test documents")
    return 0
