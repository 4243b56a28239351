"""Tokenizer bundles: one directory that holds everything needed to turn documents into ids and back.

    bundle/
      tokenizer.json    format, version, the vocabulary layout, and a content hash of every component
      text/spm.model    the SentencePiece model (`--text DIR`), or
      text/             tokenizer.json [+ tokenizer_config.json, special_tokens_map.json, chat_template.jinja]
                        of an existing model's tokenizer (`--text-from-hf DIR`, see `tessera.unimodal.hf_text`)
      image/            codec.json + model.safetensors (if the bundle has an image codec)
      audio/            codec.json + model.safetensors (if the bundle has an audio codec)

`tokenizer.json["chat"]` is the chat template that renders conversations (tessera.tokenizers.chat).

`tokenizer.json["hash"]` identifies the bundle: shard manifests and runs record it, and loading data or a
model with a different bundle is refused. A text-only bundle is valid.

A bundle is written at the lowest format version that can hold it: version 1 (a SentencePiece text
tokenizer; a bundle written before chat templates has no "chat" key and keeps its hash, so every run that
records it stays valid) or version 2 (an HF text tokenizer: `text.kind` "hf", with the document delimiters it was built with and
a fingerprint of its vocabulary), which earlier tessera refuses by its version rather than misreading.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tessera.errors import TesseraError
from tessera.storage import (
    atomic_write_bytes,
    atomic_write_json,
    make_temp_dir,
    read_header,
    read_json,
    replace_dir,
    sha256_dir,
    sha256_file,
)
from tessera.tokenizers.chat import ChatError, ChatTemplate
from tessera.tokenizers.layout import DEFAULT_MAX_GRID, DEFAULT_RESERVED, LayoutError, VocabLayout
from tessera.tokenizers.multimodal import MultimodalTokenizer
from tessera.unimodal import CODEC_FILES, load_codec, read_codec_info
from tessera.unimodal.hf_text import HF_TEXT_FILES, HFTextError, HFTextTokenizer, load_tokenizers_file
from tessera.unimodal.text import TextTokenizer

BUNDLE_FORMAT = "tessera-tokenizer"
BUNDLE_VERSION = 2  # the newest version this tessera reads and writes
SUPPORTED_VERSIONS = (1, 2)


class BundleError(TesseraError):
    """A tokenizer bundle that is missing, corrupt, or inconsistent."""


def _bundle_hash(spec: dict) -> str:
    # "chat" joined later: a bundle without a template keeps the hash it was built with
    core = {k: spec[k] for k in ("format", "version", "layout", "text", "image", "audio", "chat") if k in spec}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def _is_bundle_dir(path: Path) -> bool:
    """Whether `path` holds a tessera bundle (even one whose hash no longer matches)."""
    try:
        return read_json(path / "tokenizer.json").get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_bundle(
    out: str | Path,
    text: str | Path | None = None,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    *,
    text_from_hf: str | Path | None = None,
    bos: str | None = None,
    eos: str | None = None,
    max_grid: int = DEFAULT_MAX_GRID,
    n_reserved: int = DEFAULT_RESERVED,
    audio_levels: int | None = None,
    chat_template: dict | None = None,
    force: bool = False,
) -> dict:
    """Assemble a bundle from a text tokenizer and optional image/audio codec directories.

    The text tokenizer is either `text`, a SentencePiece text codec directory (or `.model` file), or
    `text_from_hf`, a local Hugging Face tokenizer folder whose ids become the text range unchanged (all of
    them, added tokens included); `bos`/`eos` then choose the document delimiters by token (default: the
    tokenizer's bos_token and eos_token; its EOS in both places when it has no BOS).

    `audio_levels` keeps only the first K residual levels of the audio codec in the vocabulary (default:
    all of them): a codec trained with quantizer dropout decodes from any prefix of its levels, so one codec
    serves several bitrates, and each level dropped shortens every audio span by one token per frame.
    `chat_template` (role prefixes, see tessera.tokenizers.chat) renders conversations; default `DEFAULT_CHAT`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BundleError(f"{out} already exists; pass --force to replace it")
        if not _is_bundle_dir(out):  # --force replaces a bundle, never a directory of something else
            raise BundleError(f"{out} is not a tokenizer bundle (no tokenizer.json of format {BUNDLE_FORMAT!r}); "
                              f"--force only replaces a bundle: choose another --out")
    if (text is None) == (text_from_hf is None):
        raise BundleError("give one text tokenizer: --text DIR (SentencePiece, `tessera tokenizer train text`) or "
                          "--text-from-hf DIR (an existing model's tokenizer)")
    if text_from_hf is None and (bos or eos):
        raise BundleError("--bos and --eos choose the delimiters of a --text-from-hf tokenizer; a SentencePiece "
                          "tokenizer's are <s> and </s>")
    if text is not None:
        text_dir = Path(text)
        spm_path = text_dir / "spm.model" if text_dir.is_dir() else text_dir
        if not spm_path.is_file():
            raise BundleError(f"no SentencePiece model at {spm_path} (train one with `tessera tokenizer train text`)")
        text_tok = TextTokenizer.load(spm_path)
    else:
        hf_dir = Path(text_from_hf)
        try:
            text_tok = HFTextTokenizer.from_folder(hf_dir, bos=bos, eos=eos)
        except HFTextError as e:
            raise BundleError(f"--text-from-hf: {e}") from None
        bad = text_tok.round_trip_failures()
        if bad:
            s, d = bad[0]
            print(f"[tessera] warning: the tokenizer in {hf_dir} does not give back the text it encodes "
                  f"({len(bad)} of its probe strings; {s!r} decodes to {d!r}): text decoded from ids may differ "
                  f"from the input")
    try:
        chat = ChatTemplate.from_dict(chat_template).to_dict()
    except ChatError as e:
        raise BundleError(str(e)) from None
    infos = {}
    for kind, src in (("image", image), ("audio", audio)):
        if src is None:
            continue
        info = read_codec_info(src)
        if info.kind != kind:
            raise BundleError(f"{src} holds a codec of kind {info.kind!r}, but was given as --{kind}")
        infos[kind] = info
    if "image" in infos and infos["image"].max_size:
        info = infos["image"]
        largest = info.max_size // info.downsample
        if largest > max_grid:  # else the first large image would stop pretokenization
            raise BundleError(f"--max-grid {max_grid} is smaller than the image codec's largest grid, {largest} codes "
                              f"per side ({info.max_size} px at {info.downsample} px per code): use --max-grid "
                              f"{largest} or more")
    levels = infos["audio"].levels if "audio" in infos else 0
    if audio_levels is not None:
        if "audio" not in infos:
            raise BundleError("audio_levels was given without an audio codec")
        if not 1 <= audio_levels <= levels:
            raise BundleError(f"audio_levels must be between 1 and the audio codec's {levels} levels, got {audio_levels}")
        levels = audio_levels
    layout = VocabLayout(
        text_size=text_tok.vocab_size,
        image_codebook_size=infos["image"].codebook_size if "image" in infos else 0,
        audio_codebook_size=infos["audio"].codebook_size if "audio" in infos else 0,
        audio_levels=levels,
        max_grid=max_grid,
        n_reserved=n_reserved,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        (tmp / "text").mkdir()
        if text is not None:
            shutil.copyfile(spm_path, tmp / "text" / "spm.model")
            text_entry = {"path": "text/spm.model", "sha256": sha256_file(tmp / "text" / "spm.model")}
            version = 1
        else:
            files = [n for n in HF_TEXT_FILES if (hf_dir / n).is_file()]
            for n in files:
                atomic_write_bytes(tmp / "text" / n, (hf_dir / n).read_bytes())
            text_entry = {
                "kind": "hf",
                "path": "text",
                "files": files,
                "sha256": sha256_dir(tmp / "text", files),
                "vocab_size": text_tok.vocab_size,
                "vocab_sha256": text_tok.fingerprint(),
                "bos": {"token": text_tok.bos_token, "id": text_tok.bos_id},
                "eos": {"token": text_tok.eos_token, "id": text_tok.eos_id},
                "unk": text_tok.unk_id,
                "round_trip": not bad,
            }
            version = 2
        spec = {
            "format": BUNDLE_FORMAT,
            "version": version,
            "layout": layout.to_dict(),
            "text": text_entry,
            "image": None,
            "audio": None,
            "chat": chat,
        }
        for kind, src in (("image", image), ("audio", audio)):
            if src is None:
                continue
            (tmp / kind).mkdir()
            for name in CODEC_FILES:
                shutil.copyfile(Path(src) / name, tmp / kind / name)
            spec[kind] = {
                "path": kind,
                "sha256": sha256_dir(tmp / kind, list(CODEC_FILES)),
                "info": infos[kind].to_dict(),
            }
        spec["hash"] = _bundle_hash(spec)
        atomic_write_json(tmp / "tokenizer.json", spec)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec


def read_bundle_spec(bundle: str | Path) -> dict:
    path = Path(bundle) / "tokenizer.json"
    spec = read_header(path, BUNDLE_FORMAT, SUPPORTED_VERSIONS, "tokenizer bundle", BundleError)
    if spec.get("hash") != _bundle_hash(spec):
        raise BundleError(f"{path}: the stored hash does not match the contents; the file was edited or corrupted")
    return spec


def text_kind(spec: dict) -> str:
    """"sentencepiece" or "hf": which text tokenizer a bundle holds."""
    return spec["text"].get("kind", "sentencepiece")


def load_text(bundle: str | Path, spec: dict, verify: bool = True) -> TextTokenizer | HFTextTokenizer:
    """A bundle's text tokenizer (checked against its recorded hash with `verify`)."""
    bundle, entry = Path(bundle), spec["text"]
    kind = text_kind(spec)
    if kind == "sentencepiece":
        text_path = bundle / entry["path"]
        if verify and sha256_file(text_path) != entry["sha256"]:
            raise BundleError(f"{bundle}: the text model {text_path} does not match its recorded hash")
        return TextTokenizer.load(text_path)
    if kind != "hf" or spec.get("version", 1) < 2:
        raise BundleError(f"{bundle}: text tokenizer kind {kind!r} is not one this tessera reads")
    tdir = bundle / entry["path"]
    missing = [n for n in entry["files"] if not (tdir / n).is_file()]
    if missing:
        raise BundleError(f"{bundle}: the text tokenizer's {', '.join(missing)} is missing from {tdir}")
    if verify and sha256_dir(tdir, list(entry["files"])) != entry["sha256"]:
        raise BundleError(f"{bundle}: the text tokenizer in {tdir} does not match its recorded hash")
    try:
        tok = HFTextTokenizer(load_tokenizers_file(tdir / "tokenizer.json"), entry["bos"]["token"],
                              entry["eos"]["token"])
    except HFTextError as e:
        raise BundleError(f"{bundle}: {e}") from None
    tok.unk_id = entry.get("unk")
    got = (tok.vocab_size, tok.bos_id, tok.eos_id)
    want = (entry["vocab_size"], entry["bos"]["id"], entry["eos"]["id"])
    if got != want:
        raise BundleError(f"{bundle}: the text tokenizer has {got[0]} ids with BOS {got[1]} and EOS {got[2]}, but "
                          f"the bundle records {want[0]}, {want[1]} and {want[2]}")
    return tok


def load_bundle(bundle: str | Path, device=None, verify: bool = True) -> MultimodalTokenizer:
    """Load a bundle; with `verify`, every component's content hash is checked first."""
    bundle = Path(bundle)
    spec = read_bundle_spec(bundle)
    try:
        layout = VocabLayout.from_dict(spec["layout"])
    except LayoutError as e:
        raise BundleError(f"{bundle}: {e}") from None
    text = load_text(bundle, spec, verify)
    codecs = {}
    for kind in ("image", "audio"):
        entry = spec.get(kind)
        if not entry:
            continue
        cdir = bundle / entry["path"]
        if verify and sha256_dir(cdir, list(CODEC_FILES)) != entry["sha256"]:
            raise BundleError(f"{bundle}: the {kind} codec in {cdir} does not match its recorded hash")
        codec = load_codec(cdir, device=device or "cpu")
        if codec.info.to_dict() != entry["info"]:
            raise BundleError(f"{bundle}: the {kind} codec's info {codec.info} differs from the bundle's record")
        codecs[kind] = codec
    try:
        return MultimodalTokenizer(
            layout,
            text,
            codecs.get("image"),
            codecs.get("audio"),
            bundle_hash=spec["hash"],
            device=device or "cpu",
            chat=ChatTemplate.from_dict(spec.get("chat")),
        )
    except LayoutError as e:
        raise BundleError(f"{bundle}: {e}") from None
