"""Tokenizer bundles: one directory that holds everything needed to turn documents into ids and back.

    bundle/
      tokenizer.json    format, version, the vocabulary layout, and a content hash of every component
      text/spm.model    the SentencePiece model
      image/            codec.json + model.safetensors (if the bundle has an image codec)
      audio/            codec.json + model.safetensors (if the bundle has an audio codec)

`tokenizer.json["chat"]` is the chat template that renders conversations (tessera.tokenizers.chat).

`tokenizer.json["hash"]` identifies the bundle: shard manifests and runs record it, and loading data or a
model with a different bundle is refused. A text-only bundle is valid.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tessera.errors import TesseraError
from tessera.storage import atomic_write_json, make_temp_dir, read_header, read_json, replace_dir, sha256_dir, sha256_file
from tessera.tokenizers.chat import ChatError, ChatTemplate
from tessera.tokenizers.layout import DEFAULT_MAX_GRID, DEFAULT_RESERVED, LayoutError, VocabLayout
from tessera.tokenizers.multimodal import MultimodalTokenizer
from tessera.unimodal import CODEC_FILES, load_codec, read_codec_info
from tessera.unimodal.text import TextTokenizer

BUNDLE_FORMAT = "tessera-tokenizer"
BUNDLE_VERSION = 1


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
    text: str | Path,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    *,
    max_grid: int = DEFAULT_MAX_GRID,
    n_reserved: int = DEFAULT_RESERVED,
    audio_levels: int | None = None,
    chat_template: dict | None = None,
    force: bool = False,
) -> dict:
    """Assemble a bundle from a text tokenizer directory and optional image/audio codec directories.

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
    text_dir = Path(text)
    spm_path = text_dir / "spm.model" if text_dir.is_dir() else text_dir
    if not spm_path.is_file():
        raise BundleError(f"no SentencePiece model at {spm_path} (train one with `tessera tokenizer train text`)")
    text_tok = TextTokenizer.load(spm_path)
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
            raise BundleError(f"{src} holds a {info.kind} codec, but was given as --{kind}")
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
        shutil.copyfile(spm_path, tmp / "text" / "spm.model")
        spec = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "layout": layout.to_dict(),
            "text": {"path": "text/spm.model", "sha256": sha256_file(tmp / "text" / "spm.model")},
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
    spec = read_header(path, BUNDLE_FORMAT, BUNDLE_VERSION, "tokenizer bundle", BundleError)
    if spec.get("hash") != _bundle_hash(spec):
        raise BundleError(f"{path}: the stored hash does not match the contents; the file was edited or corrupted")
    return spec


def load_bundle(bundle: str | Path, device=None, verify: bool = True) -> MultimodalTokenizer:
    """Load a bundle; with `verify`, every component's content hash is checked first."""
    bundle = Path(bundle)
    spec = read_bundle_spec(bundle)
    try:
        layout = VocabLayout.from_dict(spec["layout"])
    except LayoutError as e:
        raise BundleError(f"{bundle}: {e}") from None
    text_path = bundle / spec["text"]["path"]
    if verify and sha256_file(text_path) != spec["text"]["sha256"]:
        raise BundleError(f"{bundle}: the text model {text_path} does not match its recorded hash")
    text = TextTokenizer.load(text_path)
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
