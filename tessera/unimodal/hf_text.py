"""Text codec from an existing model: a local Hugging Face tokenizer folder, read with the `tokenizers` library.

The folder needs `tokenizer.json` (a fast tokenizer; `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`
writes one for a model that ships only slow-tokenizer files); `tokenizer_config.json` and
`special_tokens_map.json` are read where present, for the names of the BOS and EOS tokens, and a bundle
copies them and `chat_template.jinja` (kept for the export's tokenizer). Nothing is
downloaded and no code of the model's is run.

- Ids are the tokenizer's, unchanged, including its added tokens: `vocab_size` is one more than its largest
  id, so a model trained with the tokenizer keeps the meaning of every row it has for them.
- Text is encoded as the model's own tokenizer encodes it with `add_special_tokens=False`: nothing is
  prepended or appended (tessera adds the document delimiters itself), and text that spells one of the
  tokenizer's added tokens (`<|im_start|>`) becomes that token, as in transformers.
- Decoding keeps special tokens (skip_special_tokens=False) and does no clean-up of spaces, so
  `decode(encode(s)) == s` wherever the tokenizer itself is lossless: byte-level BPE (GPT-2, Llama 3, Qwen)
  is, for every string without a normalizer; a normalizer (Qwen's NFC) or a dummy prefix can change text,
  and `build_bundle` warns when its probe strings do not round-trip.
- The document delimiters are the tokenizer's `bos_token` and `eos_token` (or the ones the bundle was built
  with: `--bos`, `--eos`). A tokenizer without a BOS (Qwen) uses its EOS in both places: documents are
  `<eos> … <eos>`, the separator such models were pretrained with between documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tessera.errors import TesseraError
from tessera.storage import read_json

# The files a bundle copies from a tokenizer folder (tokenizer.json is required).
HF_TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Strings a tokenizer is asked to round-trip when a bundle is built.
PROBES = ("the digit 7 is written 7", "  two  spaces and a tab\there", "line one\nline two\n",
          "café naïve Ångström", "日本語のテキスト", "emoji 😀🚀 👍🏽")


class HFTextError(TesseraError):
    """A Hugging Face tokenizer folder that cannot serve as a bundle's text tokenizer."""


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_hf_config(folder: Path) -> dict:
    """special_tokens_map.json overlaid with tokenizer_config.json (either may be missing), and the chat
    template of chat_template.jinja (where transformers 5 saves it) if there is one."""
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / name
        if p.is_file():
            d = read_json(p)
            if isinstance(d, dict):
                cfg.update(d)  # tokenizer_config.json's word is last: its "bos_token": null means no BOS
    if (folder / "chat_template.jinja").is_file():
        cfg["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return cfg


def vocab_fingerprint(tokenizer) -> str:
    """SHA-256 of a `tokenizers.Tokenizer`'s (id, token) pairs, added tokens included: two tokenizers with
    the same fingerprint give every id the same meaning."""
    pairs = sorted((i, t) for t, i in tokenizer.get_vocab(with_added_tokens=True).items())
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def load_tokenizers_file(path: Path):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a file it cannot parse)
        raise HFTextError(f"{path} is not a tokenizer.json the tokenizers library can read: {e}") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


class HFTextTokenizer:
    """A `tokenizers.Tokenizer` with the interface of `TextTokenizer` (encode, decode, piece, ids)."""

    kind = "hf"

    def __init__(self, tokenizer, bos: str, eos: str, unk: str | None = None):
        self.tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise HFTextError("the tokenizer has an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1
        self.bos_token, self.eos_token = bos, eos
        ids = {}
        for role, token in (("bos", bos), ("eos", eos)):
            i = tokenizer.token_to_id(token)
            if i is None:
                raise HFTextError(f"the {role} token {token!r} is not in the tokenizer's vocabulary")
            ids[role] = int(i)
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        u = tokenizer.token_to_id(unk) if unk else None
        self.unk_id = int(u) if u is not None else None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, bos: str | None = None, eos: str | None = None
                    ) -> HFTextTokenizer:
        """Load a tokenizer folder; `bos`/`eos` override the tokenizer's own (see the module docstring)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise HFTextError(f"{folder} is not a directory (expected a Hugging Face tokenizer folder)")
        path = folder / "tokenizer.json"
        if not path.is_file():
            extra = [n for n in ("tokenizer.model", "vocab.json", "merges.txt") if (folder / n).is_file()]
            hint = (f" ({', '.join(extra)} are slow-tokenizer files: save a fast tokenizer with "
                    f"`AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`)") if extra else ""
            raise HFTextError(f"no tokenizer.json in {folder}{hint}")
        cfg = read_hf_config(folder)
        eos = eos or _token_name(cfg.get("eos_token"))
        if eos is None:
            raise HFTextError(f"the tokenizer in {folder} names no eos_token (tokenizer_config.json or "
                              f"special_tokens_map.json): choose the document delimiter with --eos TOKEN")
        bos = bos or _token_name(cfg.get("bos_token")) or eos
        return cls(load_tokenizers_file(path), bos, eos, _token_name(cfg.get("unk_token")))

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, i: int) -> str:
        t = self.tok.id_to_token(int(i))
        return t if t is not None else f"<missing {int(i)}>"

    def fingerprint(self) -> str:
        return vocab_fingerprint(self.tok)

    def round_trip_failures(self, probes: Iterable[str] = PROBES) -> list[tuple[str, str]]:
        """(text, decoded) for each probe that does not decode back to itself."""
        return [(s, d) for s in probes if (d := self.decode(self.encode(s))) != s]
