"""Evaluation tasks as data: a prompt, the output modality, an expected label and a judge.

A task file is JSONL, one item per line (media paths relative to the file):

    {"task": "caption_acc", "prompt": [{"image": "images/test/0005.png"}], "output": "text", "label": 5,
     "judge": "text_digit", "generate": {"temperature": 0, "max_new_tokens": 12}}

An item with `"via": "text"` (image or audio outputs only) is answered in two modalities, in order: the model
first continues the prompt in text (greedy, up to where it opens a span or ends, at most 24 tokens), and the
media output is generated after that text. The digits set uses it for speech->image when the corpus's
speech->image documents carry the transcript between the clip and the image (the default; SpeechGPT's
"chain of modality": hear, write the words, then draw them).

Judges (`tessera.eval.judges`):
- `text_digit`: the first digit named in the generated text (a word or a numeral) must equal the label;
- `text_match`: the label (a string) must occur in the generated text, ignoring case;
- `image_digit`: an independent image classifier, trained on the corpus's real training images only;
- `speech_digit`: an independent MFCC classifier, trained on the corpus's real training clips only.

`digits_tasks(corpus)` builds the built-in `digits` set from a corpus's held-out split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.data.digits import DIGIT_WORDS, load_meta

DIGIT_TASKS = ("caption_acc", "draw_acc", "transcribe_acc", "speak_acc", "speech_to_image_acc")


class TaskError(TesseraError):
    pass


@dataclass
class TaskItem:
    task: str
    prompt: list[dict]
    output: str
    label: Any
    judge: str
    generate: dict = field(default_factory=dict)
    # "text": the model first continues the prompt in text (greedy, up to where it would open a span or end),
    # and that text joins the prompt before the output is generated: an answer in two modalities, in order
    via: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TaskItem":
        try:
            item = cls(task=d["task"], prompt=d["prompt"], output=d.get("output", "text"), label=d["label"],
                       judge=d["judge"], generate=d.get("generate", {}), via=d.get("via"))
        except KeyError as e:
            raise TaskError(f"a task item needs the key {e.args[0]!r}: {str(d)[:120]}") from None
        if item.via not in (None, "text"):
            raise TaskError(f"task {item.task}: via must be \"text\" or absent, not {item.via!r}")
        if item.via and item.output not in ("image", "audio"):
            raise TaskError(f"task {item.task}: via=\"text\" needs an image or audio output, not {item.output!r}")
        if item.output not in ("text", "image", "audio", "any"):
            raise TaskError(f"task {item.task}: unknown output {item.output!r}")
        for seg in item.prompt:
            if not isinstance(seg, dict) or len([k for k in ("text", "image", "audio") if k in seg]) != 1:
                raise TaskError(f"task {item.task}: a prompt segment needs exactly one of text/image/audio: {seg}")
        return item


def load_tasks(path: str | Path) -> tuple[list[TaskItem], Path]:
    p = Path(path)
    items = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    items.append(TaskItem.from_dict(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise TaskError(f"{p}:{n}: not valid JSON ({e})") from None
    if not items:
        raise TaskError(f"{p} holds no tasks")
    return items, p.parent


def save_tasks(items: list[TaskItem], path: str | Path) -> None:
    from tessera.storage import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(asdict(i)) + "\n" for i in items))


@dataclass
class ModalitySampling:
    """Sampling per output modality: image codes and audio frames want different settings (see
    docs/generalization.md for the measurements behind the defaults)."""

    image_temperature: float = 0.5
    image_top_k: int = 0
    image_cfg_scale: float = 3.0
    audio_temperature: float = 0.3
    audio_top_k: int = 0
    audio_cfg_scale: float = 3.0

    def sampling(self, output: str) -> dict:
        """The generation arguments for an `output` of "image" or "audio"."""
        return {k: getattr(self, f"{output}_{k}") for k in ("temperature", "top_k", "cfg_scale")}


@dataclass
class DigitsEvalConfig(ModalitySampling):
    draw_seeds: int = 10  # generations per digit for draw_acc and speak_acc
    max_items: int = 0  # cap on caption/transcribe/speech_to_image items (0: the whole test split)
    # speech->image: "text" writes the transcript before drawing, "direct" draws at once, "auto" follows the
    # corpus (its speech->image documents carry the transcript or not)
    speech_to_image_via: str = "auto"

    def __post_init__(self):
        if self.speech_to_image_via not in ("auto", "text", "direct"):
            raise TaskError(f"speech_to_image_via must be auto, text or direct, not {self.speech_to_image_via!r}")


def digits_tasks(corpus: str | Path, cfg: DigitsEvalConfig | None = None) -> list[TaskItem]:
    """The built-in `digits` task set, over the corpus's held-out images and voices (paths relative to it)."""
    cfg = cfg or DigitsEvalConfig()
    meta = load_meta(corpus)
    images, clips = meta["images"]["test"], meta["speech"]["test"]
    if cfg.max_items:
        step_i = max(1, len(images) // cfg.max_items)
        step_c = max(1, len(clips) // cfg.max_items)
        images, clips = images[::step_i][: cfg.max_items], clips[::step_c][: cfg.max_items]
    via = cfg.speech_to_image_via
    if via == "auto":
        via = "text" if meta.get("config", {}).get("speech_image_transcript") else "direct"
    greedy = {"temperature": 0, "max_new_tokens": 12}
    draw, say = cfg.sampling("image"), cfg.sampling("audio")
    items = []
    for e in images:
        items.append(TaskItem("caption_acc", [{"image": e["path"]}], "text", e["label"], "text_digit", greedy))
    for d in range(10):
        for s in range(cfg.draw_seeds):
            items.append(TaskItem("draw_acc", [{"text": f"a drawing of the digit {DIGIT_WORDS[d]}"}], "image", d,
                                  "image_digit", {**draw, "seed": 1000 * d + s}))
    for e in clips:
        items.append(TaskItem("transcribe_acc", [{"audio": e["path"]}], "text", e["label"], "text_digit", greedy))
    for d in range(10):
        for s in range(cfg.draw_seeds):
            items.append(TaskItem("speak_acc", [{"text": f"say {DIGIT_WORDS[d]}"}], "audio", d, "speech_digit",
                                  {**say, "seed": 1000 * d + s, "max_audio_seconds": 1.5}))
    for e in clips:
        items.append(TaskItem("speech_to_image_acc", [{"audio": e["path"]}], "image", e["label"], "image_digit",
                              {**draw, "seed": 7}, via="text" if via == "text" else None))
    return items


def digit_in_text(text: str) -> int | None:
    """The first digit a text names, as a word ("seven") or a numeral ("7"); None if it names none."""
    import re

    pattern = r"\b(" + "|".join(DIGIT_WORDS) + r")\b|(\d)"
    m = re.search(pattern, text.lower())
    if not m:
        return None
    return DIGIT_WORDS.index(m.group(1)) if m.group(1) else int(m.group(2))
