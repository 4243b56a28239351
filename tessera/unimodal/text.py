"""The text tokenizer: a SentencePiece BPE model with byte fallback.

- BPE with `byte_fallback`: a character missing from the vocabulary is spelled as UTF-8 byte pieces, so
  every Unicode string (emoji, mixed scripts, control characters) encodes and decodes exactly.
- Normalization is `identity`, no dummy prefix and no whitespace folding: `decode(encode(s)) == s`
  byte for byte, which the multimodal tokenizer needs to splice text between image and audio spans.
- Training streams the input files line by line; sentencepiece keeps a seeded reservoir sample of
  `input_sentence_size` sentences, so inputs larger than memory are fine and training is deterministic
  for a given seed.

A text tokenizer directory holds `spm.model` and `text.json` (the training options and the model's hash).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

from tessera.errors import TesseraError
from tessera.runtime.monitor import progress_bar
from tessera.storage import atomic_write_bytes, atomic_write_json, check_output_dir, sha256_file

TEXT_FORMAT = "tessera-text"
TEXT_VERSION = 1
# sentencepiece skips sentences longer than this many bytes; longer lines are cut into pieces of this size.
MAX_SENTENCE_BYTES = 4096
# Byte fallback needs 256 byte pieces plus <unk>, <s>, </s>; leave room for some merges.
MIN_VOCAB_SIZE = 300


class TextTokenizerError(TesseraError):
    """Bad input to text tokenizer training or loading."""


@dataclass
class TextTrainConfig:
    vocab_size: int = 8000
    seed: int = 0
    character_coverage: float = 0.9995
    input_sentence_size: int = 2_000_000  # sentences kept by reservoir sampling
    max_sentence_bytes: int = MAX_SENTENCE_BYTES
    split_digits: bool = True
    num_threads: int = 2


class TextTokenizer:
    """SentencePiece wrapper. Ids are the SentencePiece ids, unchanged: 0 <unk>, 1 <s>, 2 </s>."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)
        self.vocab_size = int(self.sp.GetPieceSize())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        self.unk_id = int(self.sp.unk_id())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Load from a text tokenizer directory or a `.model` file."""
        path = Path(path)
        model = path / "spm.model" if path.is_dir() else path
        if not model.is_file():
            raise TextTokenizerError(f"no SentencePiece model at {model}")
        return cls(model.read_bytes())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def serialized(self) -> bytes:
        return self._proto


def _iter_sentences(paths: list[Path], max_bytes: int, bar, stats: dict) -> Iterator[str]:
    """Yield lines of the input files, cutting long lines; count lines that are not UTF-8."""
    for p in paths:
        with open(p, "rb") as f:
            for raw in f:
                bar.update(len(raw))
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    stats["not_utf8"] += 1
                    continue
                if not line:
                    continue
                stats["lines"] += 1
                data = line.encode("utf-8")
                if len(data) <= max_bytes:
                    yield line
                    continue
                # Cut at character boundaries, close to max_bytes each.
                start = 0
                while start < len(data):
                    end = min(start + max_bytes, len(data))
                    while end < len(data) and (data[end] & 0xC0) == 0x80:
                        end -= 1
                    yield data[start:end].decode("utf-8")
                    start = end


def _check_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    if not inputs:
        raise TextTokenizerError("no input files given")
    paths = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise TextTokenizerError(f"input file {p} does not exist")
        if p.is_dir():
            raise TextTokenizerError(f"input {p} is a directory; give text files")
        if not os.access(p, os.R_OK):
            raise TextTokenizerError(f"input file {p} is not readable")
        paths.append(p)
    if sum(p.stat().st_size for p in paths) == 0:
        raise TextTokenizerError(f"input files are empty: {', '.join(map(str, paths))}")
    return paths


def train_text_tokenizer(
    inputs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: TextTrainConfig | None = None,
    progress: bool = True,
) -> TextTokenizer:
    """Train a SentencePiece BPE model with byte fallback and write a text tokenizer directory."""
    cfg = config or TextTrainConfig()
    if cfg.vocab_size < MIN_VOCAB_SIZE:
        raise TextTokenizerError(
            f"--vocab-size {cfg.vocab_size} is too small: byte fallback alone needs 259 ids; use >= {MIN_VOCAB_SIZE}"
        )
    paths = _check_inputs(inputs)
    # an existing text tokenizer is replaced (the bundle records its hash); a directory of other files is not
    check_output_dir(out_dir, paths, noun="a text tokenizer", markers=("spm.model", "text.json"),
                     error=TextTokenizerError)
    total = sum(p.stat().st_size for p in paths)
    stats = {"lines": 0, "not_utf8": 0}
    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    with progress_bar(total=total, unit="B", unit_scale=True, desc="read text", disable=not progress) as bar:
        sentences = _iter_sentences(paths, cfg.max_sentence_bytes, bar, stats)
        try:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=sentences,
                model_writer=model,
                model_type="bpe",
                vocab_size=cfg.vocab_size,
                byte_fallback=True,
                character_coverage=cfg.character_coverage,
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_digits=cfg.split_digits,
                allow_whitespace_only_pieces=True,
                max_sentence_length=cfg.max_sentence_bytes + 16,
                input_sentence_size=cfg.input_sentence_size,
                shuffle_input_sentence=True,
                num_threads=cfg.num_threads,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e)
            if stats["lines"] == 0:
                raise TextTokenizerError(
                    f"no usable text in {', '.join(map(str, paths))}: every line was empty or not UTF-8"
                ) from None
            if "smaller than required_chars" in msg:
                raise TextTokenizerError(
                    f"--vocab-size {cfg.vocab_size} cannot hold the characters the input needs at "
                    f"--character-coverage {cfg.character_coverage} ({msg.strip()}); use a larger vocabulary "
                    "or a lower coverage (rare characters then fall back to bytes)"
                ) from None
            if "Vocabulary size" in msg or "vocab_size" in msg:
                raise TextTokenizerError(
                    f"the input is too small for --vocab-size {cfg.vocab_size} ({msg.strip()}); "
                    "use a smaller vocabulary or more text"
                ) from None
            raise TextTokenizerError(f"sentencepiece training failed: {msg.strip()}") from None
    if stats["lines"] == 0:
        raise TextTokenizerError(
            f"no usable text in {', '.join(map(str, paths))}: every line was empty or not UTF-8"
        )
    if stats["not_utf8"]:
        print(f"[tessera] skipped {stats['not_utf8']} line(s) that are not valid UTF-8")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "spm.model", model.getvalue())
    atomic_write_json(
        out / "text.json",
        {
            "format": TEXT_FORMAT,
            "version": TEXT_VERSION,
            "kind": "text",
            "config": asdict(cfg),
            "inputs": [str(p) for p in paths],
            "input_bytes": total,
            "lines": stats["lines"],
            "skipped_not_utf8": stats["not_utf8"],
            "sha256": sha256_file(out / "spm.model"),
        },
    )
    return TextTokenizer(model.getvalue())

