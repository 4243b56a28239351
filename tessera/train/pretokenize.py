"""`tessera data pretokenize`: documents.jsonl -> token shards, with several worker processes.

Documents (DESIGN.md): one JSON object per line,
    {"segments": [{"text": "a drawing of"}, {"image": "img/7.png"}, {"audio": "wav/7.wav", "loss": false}],
     "source": "digits"}
with media paths relative to the JSONL file. Each document becomes `<s> ...segments... </s>`; a segment
with `"loss": false` is context only (its tokens get mask 0). The source (default: the file's stem) feeds
mixture weights in the loader.

The inputs are cut into chunks of `docs_per_shard` lines; each worker process (one intra-op thread each)
loads the tokenizer bundle once and turns a chunk into one shard, encoding the chunk's images and clips in
batches (on CUDA when it is available). Shards are written in input order whatever the workers' timing, so
the output is the same for any number of workers.

Bad samples (unparseable line, missing or corrupt media, an image smaller than one code, audio that is
empty, non-finite or longer than `--max-audio-seconds`, an empty document, media the bundle has no codec
for) are skipped and counted, with reasons and examples, in manifest.json; `--strict` makes the first one
an error instead.

Re-running into an existing output resumes after the last complete shard. A different tokenizer bundle or
changed inputs are refused (never two tokenizers in one shard set); `--force` starts over, deleting the
output only if it is a shard set (or empty) that holds none of the inputs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tessera.tokenizers.bundle import read_bundle_spec
from tessera.tokenizers.layout import MODALITIES, VocabLayout
from tessera.train.monitor import progress_bar
from tessera.train.shards import (SHARDS_FORMAT, SHARDS_VERSION, ShardError, read_manifest, write_manifest,
                                  write_shard, write_source_index)
from tessera.unimodal.media import DEFAULT_MAX_PIXELS, MediaError, SkipLog, load_audio, load_image


@dataclass
class PretokenizeConfig:
    docs_per_shard: int = 4096
    workers: int = 2
    strict: bool = False
    max_audio_seconds: float = 60.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"  # where the codecs run in the workers


# --------------------------------------------------------------------------------------- chunk planning
def fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_chunks(inputs: list[Path], docs_per_shard: int) -> list[tuple[int, int, int, int]]:
    """(input index, byte offset, number of lines, first line number) of every chunk, in input order."""
    chunks = []
    for fi, path in enumerate(inputs):
        offset, start, n, first = 0, 0, 0, 1
        with open(path, "rb") as f:
            for line in f:
                if n == docs_per_shard:
                    chunks.append((fi, start, n, first))
                    start, first, n = offset, first + n, 0
                offset += len(line)
                n += 1
        if n:
            chunks.append((fi, start, n, first))
    return chunks


# ------------------------------------------------------------------------------------------- workers
_W: dict = {}


def _init_worker(bundle: str, cfg_dict: dict, inputs: list[str]) -> None:
    import torch

    from tessera.tokenizers.bundle import load_bundle
    from tessera.train.distributed import resolve_device

    # One thread per worker: parallelism comes from --workers, and the codes do not depend on how many there
    # are (a different thread count can round a codec's float math differently and flip a code).
    torch.set_num_threads(1)
    cfg = PretokenizeConfig(**cfg_dict)
    device = resolve_device(cfg.device)
    _W.update(tok=load_bundle(bundle, device=device), cfg=cfg, inputs=[Path(p) for p in inputs], cache=CodeCache())


class CodeCache:
    """Codes of media files already encoded by this worker, keyed by path, size and mtime.

    Corpora often reuse a file across documents (the digits corpus puts each clip in three or four
    directions); each is then read and encoded once. Bounded by the bytes of codes it holds.
    """

    def __init__(self, max_bytes: int = 256 * 2**20):
        from collections import OrderedDict

        self.items: OrderedDict = OrderedDict()
        self.bytes, self.max_bytes = 0, max_bytes

    @staticmethod
    def key(kind: str, path: Path) -> tuple:
        st = path.stat()
        return (kind, str(path.resolve()), st.st_size, st.st_mtime_ns)

    def get(self, key):
        codes = self.items.get(key)
        if codes is not None:
            self.items.move_to_end(key)
        return codes

    def put(self, key, codes: np.ndarray) -> None:
        if key in self.items:
            return
        self.items[key] = codes
        self.bytes += codes.nbytes
        while self.bytes > self.max_bytes and self.items:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _parse(line: bytes, base: Path, tok, cfg: PretokenizeConfig) -> tuple[list, str | None]:
    """A document line -> [(kind, value, loss)] with media loaded; raises _Skip."""
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Skip("bad_json", f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
        raise _Skip("no_segments", "a document needs a 'segments' list")
    source = doc.get("source")
    if source is not None and not isinstance(source, str):
        raise _Skip("bad_segment", "'source' must be a string")
    items = []
    for seg in doc["segments"]:
        kinds = [k for k in ("text", "image", "audio") if isinstance(seg, dict) and k in seg]
        if len(kinds) != 1:
            raise _Skip("bad_segment", f"a segment needs exactly one of text/image/audio: {str(seg)[:80]}")
        kind = kinds[0]
        loss = seg.get("loss", True)
        if not isinstance(loss, bool):
            raise _Skip("bad_segment", "'loss' must be true or false")
        value = seg[kind]
        if kind == "text":
            if not isinstance(value, str):
                raise _Skip("bad_segment", "a text segment must be a string")
            if value:
                items.append(("text", value, loss))
            continue
        if not isinstance(value, str):
            raise _Skip("bad_segment", f"an {kind} segment must be a path")
        path = base / value
        cache = _W.get("cache")
        try:
            key = cache.key(kind, path) if cache is not None and path.is_file() else None
            hit = cache.get(key) if key is not None else None
            if hit is not None:
                items.append((kind + "_codes", hit, loss))
                continue
            if kind == "image":
                if tok.image_codec is None:
                    raise _Skip("no_image_codec", "the document has an image but the bundle has no image codec")
                im = load_image(path, max_pixels=cfg.max_image_pixels)
                f = tok.image_codec.info.downsample
                if min(im.size) < f:
                    raise _Skip("too_small", f"{path}: {im.width}x{im.height} is smaller than one {f}x{f} code")
                items.append(("image", im, loss, key))
            else:
                if tok.audio_codec is None:
                    raise _Skip("no_audio_codec", "the document has audio but the bundle has no audio codec")
                au = load_audio(path, sample_rate=tok.audio_codec.info.sample_rate, max_seconds=cfg.max_audio_seconds)
                if au.num_samples < tok.audio_codec.info.downsample:
                    raise _Skip("too_short", f"{path}: {au.duration * 1000:.1f} ms is shorter than one frame")
                items.append(("audio", au, loss, key))
        except MediaError as e:
            raise _Skip(e.reason, str(e)) from None
    if not items:
        raise _Skip("empty", "the document has no content")
    return items, source


def _encode_chunk(chunk: tuple[int, int, int, int]) -> dict:
    tok, cfg = _W["tok"], _W["cfg"]
    fi, start, n, first = chunk
    path = _W["inputs"][fi]
    skips = SkipLog()
    docs, sources = [], []
    with open(path, "rb") as f:
        f.seek(start)
        for k in range(n):
            line = f.readline()
            where = f"{path.name}:{first + k}"
            if not line.strip():
                continue
            try:
                items, source = _parse(line, path.parent, tok, cfg)
            except _Skip as e:
                if cfg.strict:
                    raise ShardError(f"{where}: {e} (--strict)") from None
                skips.add(e.reason, f"{where}: {e}")
                continue
            docs.append(items)
            sources.append(source or path.stem)
    # Encode each distinct file of the chunk once (batched), remember its codes, then assemble the documents.
    codes: dict = {}
    cache = _W["cache"]
    for kind, encode in (("image", tok.encode_images), ("audio", tok.encode_audios)):
        todo = {}
        for d in docs:
            for item in d:
                if item[0] == kind and item[3] not in todo:
                    todo[item[3]] = item[1]
        if todo:
            for key, c in zip(todo, encode(list(todo.values()))):
                codes[key] = c
                cache.put(key, c)
    toks, masks, offsets = [], [], [0]
    for d in docs:
        ids, mask = [tok.bos_id], [0]
        for kind, v, loss, *key in d:
            if kind == "text":
                piece = tok.text.encode(v)
            elif kind in ("image", "image_codes"):
                piece = tok.image_span(codes[key[0]] if kind == "image" else v)
            else:
                piece = tok.audio_span(codes[key[0]] if kind == "audio" else v)
            ids += piece
            mask += [int(loss)] * len(piece)
        ids.append(tok.eos_id)
        mask.append(1)
        toks.append(np.asarray(ids, dtype=np.uint32))
        masks.append(np.asarray(mask, dtype=np.uint8))
        offsets.append(offsets[-1] + len(ids))
    tokens = np.concatenate(toks) if toks else np.zeros(0, np.uint32)
    return {
        "tokens": tokens,
        "mask": np.concatenate(masks) if masks else np.zeros(0, np.uint8),
        "index": np.asarray(offsets, dtype=np.uint64),
        "sources": sources,
        "skips": skips.to_dict(),
        "lines": n,
    }


# ------------------------------------------------------------------------------------------ main loop
def _check_disposable(out: Path, inputs: list[Path]) -> None:
    """`--force` deletes `out`: only a shard set (or an empty directory), and never one holding an input."""
    root = out.resolve()
    for p in inputs:
        if p.resolve().is_relative_to(root):
            raise ShardError(f"--out {out} holds the input {p}; --force would delete it: choose another --out")
    if not out.is_dir():
        raise ShardError(f"--out {out} is not a directory")
    if any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ShardError(f"--out {out} is not a shard set (no manifest.json) and is not empty; --force only "
                         f"replaces a shard set: choose another --out")


def pretokenize(bundle: str | Path, inputs: list[str | Path], out: str | Path,
                cfg: PretokenizeConfig | None = None, force: bool = False, progress: bool = True) -> dict:
    cfg = cfg or PretokenizeConfig()
    out, bundle = Path(out), Path(bundle)
    spec = read_bundle_spec(bundle)
    layout = VocabLayout.from_dict(spec["layout"])
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input {p} does not exist")
    prints = [fingerprint(p) for p in paths]
    if force and out.exists():
        _check_disposable(out, paths + [bundle])
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        manifest = read_manifest(out)
        if manifest["tokenizer_hash"] != spec["hash"]:
            raise ShardError(
                f"{out} was tokenized with bundle {manifest['tokenizer_hash'][:12]}, not {spec['hash'][:12]} "
                f"({bundle}); shards never mix tokenizers: use another --out, or --force to start over"
            )
        if manifest["inputs"] != prints or manifest["config"]["docs_per_shard"] != cfg.docs_per_shard:
            raise ShardError(f"{out} was made from other inputs or settings; use another --out, or --force to start over")
        if manifest.get("complete"):
            if progress:
                print(f"{out}: already complete ({manifest['docs']} documents, {manifest['tokens']['total']} tokens)")
            return manifest
    else:
        manifest = {
            "format": SHARDS_FORMAT, "version": SHARDS_VERSION, "tokenizer_hash": spec["hash"],
            "layout": spec["layout"], "bundle": str(bundle.resolve()), "inputs": prints, "config": asdict(cfg),
            "shards": [], "sources": [], "docs": 0, "lines": 0,
            "tokens": {"total": 0, **{m: 0 for m in MODALITIES}}, "tokens_by_source": {},
            "skipped": SkipLog().to_dict(), "complete": False,
        }
        write_manifest(out, manifest)
    chunks = plan_chunks(paths, cfg.docs_per_shard)
    done = len(manifest["shards"])
    todo = chunks[done:]
    modality = layout.modality_table()
    skips = SkipLog()
    skips.merge(manifest["skipped"])
    n_lines = sum(c[2] for c in todo)
    workers = max(1, cfg.workers)
    init_args = (str(bundle), asdict(cfg), [str(p) for p in paths])
    t0 = time.perf_counter()
    new_tokens = 0
    bar = progress_bar(total=n_lines, desc="pretokenize", unit="doc", disable=not progress)
    threads = torch.get_num_threads()
    try:
        if workers == 1:
            _init_worker(*init_args)
            results = map(_encode_chunk, todo)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args)
            results = pool.imap(_encode_chunk, todo)
        for i, res in enumerate(results, start=done):
            name = f"shard_{i:05d}"
            src_ids = []
            for s in res["sources"]:
                if s not in manifest["sources"]:
                    manifest["sources"].append(s)
                src_ids.append(manifest["sources"].index(s))
            write_shard(out, name, res["tokens"], res["index"], res["mask"], np.asarray(src_ids, np.uint16))
            n_docs = len(res["index"]) - 1
            manifest["shards"].append({"name": name, "docs": n_docs, "tokens": int(len(res["tokens"]))})
            manifest["docs"] += n_docs
            manifest["lines"] += res["lines"]
            counts = np.bincount(modality[res["tokens"].astype(np.int64)], minlength=len(MODALITIES))
            manifest["tokens"]["total"] += int(len(res["tokens"]))
            for m, c in zip(MODALITIES, counts):
                manifest["tokens"][m] += int(c)
            lengths = np.diff(res["index"].astype(np.int64))
            for s, length in zip(res["sources"], lengths):
                manifest["tokens_by_source"][s] = manifest["tokens_by_source"].get(s, 0) + int(length)
            skips.merge(res["skips"])
            manifest["skipped"] = skips.to_dict()
            write_manifest(out, manifest)
            new_tokens += len(res["tokens"])
            bar.update(res["lines"])
            dt = max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(docs_s=f"{bar.n / dt:.0f}", tok_s=f"{new_tokens / dt:.0f}", skipped=skips.total,
                            refresh=False)
    finally:
        bar.close()
        torch.set_num_threads(threads)
        if pool is not None:
            pool.terminate()
    write_source_index(out, manifest)
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    write_manifest(out, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ CLI
def add_pretokenize_arguments(p) -> None:
    p.add_argument("--tokenizer", required=True, metavar="BUNDLE")
    p.add_argument("--input", nargs="+", required=True, metavar="JSONL")
    p.add_argument("--out", required=True, metavar="SHARDS")
    p.add_argument("--workers", type=int, default=PretokenizeConfig.workers)
    p.add_argument("--docs-per-shard", type=int, default=PretokenizeConfig.docs_per_shard)
    p.add_argument("--max-audio-seconds", type=float, default=PretokenizeConfig.max_audio_seconds,
                   help="longer clips are refused (counted as too_long)")
    p.add_argument("--device", default="auto", help="where codecs run: auto, cpu or cuda")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.add_argument("--force", action="store_true", help="discard an existing shard set in --out and start over")


def run_pretokenize(args) -> int:
    cfg = PretokenizeConfig(docs_per_shard=args.docs_per_shard, workers=args.workers, strict=args.strict,
                            max_audio_seconds=args.max_audio_seconds, device=args.device)
    m = pretokenize(args.tokenizer, args.input, args.out, cfg, force=args.force)
    t = m["tokens"]
    print(f"{m['docs']} documents, {t['total']} tokens (text {t['text']}, image {t['image']}, audio {t['audio']}) "
          f"in {len(m['shards'])} shard(s) -> {args.out}")
    sk = m["skipped"]
    if sk["total"]:
        print(f"skipped {sk['total']}: " + ", ".join(f"{k}={v}" for k, v in sk["counts"].items())
              + f" (details in {Path(args.out) / 'manifest.json'})")
    return 0
