"""`tessera data pretokenize`: documents -> token shards, with worker processes and optionally several ranks.

Documents (docs/data.md): one JSON object per line,
    {"segments": [{"text": "a drawing of"}, {"image": "img/7.png"}, {"audio": "wav/7.wav", "loss": false}],
     "source": "digits"}
with media paths relative to the JSONL file, or any other format `tessera.data.readers` reads (WebDataset
tars, Parquet, saved Hugging Face datasets, image folders, LibriSpeech, Common Voice), which give the same
documents. Each document becomes `<s> ...segments... </s>`; a segment with `"loss": false` is context only
(its tokens get mask 0). The source (default: the JSONL file's stem; see docs/data.md for the others) feeds
mixture weights in the loader.

Media paths are resolved relative to the JSONL file's folder and must stay inside it, symlinks resolved
(`../x.png`, an absolute path, or a link that leaves the folder is a skip: `outside_root`), unless
`--allow-outside-paths` names the corpus as trusted. Media inside containers arrive as bytes and are decoded
in memory.

Each reader cuts its input into chunks of `docs_per_shard` records; each worker process (one intra-op thread
each) loads the tokenizer bundle once and turns a chunk into one shard, encoding the chunk's images and clips
in batches (on CUDA when it is available). A batch is encoded as soon as it is full; decoded media waiting
for their batch are all encoded at once when they pass `max_media_bytes` (`--max-media-mb`), so a worker's
memory does not grow with the chunk (see `_Media`). Shards are written in input order whatever the
workers' timing, so the output is the same for any number of workers. A worker that dies (the out-of-memory
killer, a crash) ends the run with one line naming the lines it was encoding; the shards already written are
kept, and running the same command again resumes.

Distributed (`torchrun`, or `--rank R --world-size W` from a cluster scheduler): every rank plans the same
chunks and encodes chunk k when k % W == R, into `OUT/part-RRRRR/`, a shard set of its own that resumes on its
own. The last rank to finish merges the parts into `OUT` (or `tessera data pretokenize-merge OUT` does):
the merged set is file for file the one a single process writes, its shards hard links to the parts' files.

Bad samples are skipped and counted, with reasons and examples, in manifest.json; `--strict` makes the first
one an error instead. The reasons: a line that is not JSON or that Python's parser cannot take (nested too
deep, an integer of thousands of digits: `bad_json`), a line longer than `--max-line-mb` (`line_too_long`),
no segments list or a malformed segment, a path outside the data root, missing, corrupt or truncated media,
an image larger than `max_image_pixels` or smaller than one code, an image whose grid exceeds the bundle's
`max_grid`, audio that is empty, non-finite, far outside [-1, 1], at a sample rate outside 1-384 kHz or
longer than `--max-audio-seconds`, any other error decoding one file (`decode_error`), an empty document,
media the bundle has no codec for.

Re-running into an existing output resumes after the last complete shard. A different tokenizer bundle or
changed inputs are refused (never two tokenizers in one shard set); `--force` starts over, deleting the
output only if it is a shard set (or empty) that holds none of the inputs. A run holds `OUT/.lock` while it
works, so a second run into the same `--out` is refused with the holder's pid.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tessera.data.readers import (FORMATS, READERS, ROLES, Blob, Document, Reader, ReaderOptions, Skip,
                                  file_fingerprint, open_readers, plan_lines)
from tessera.errors import TesseraError
from tessera.storage import read_json
from tessera.tokenizers.bundle import read_bundle_spec
from tessera.tokenizers.layout import MODALITIES, VocabLayout
from tessera.tokenizers.multimodal import MultimodalTokenizer
from tessera.runtime.monitor import progress_bar
from tessera.train.shards import (
    LOCK_NAME,
    SHARDS_FORMAT,
    SHARDS_VERSION,
    SUFFIXES,
    ShardError,
    _atomic_array,
    _temp_name,
    lock_output_dir,
    read_manifest,
    write_manifest,
    write_shard,
    write_source_index,
)
from tessera.unimodal.media import DEFAULT_MAX_PIXELS, MediaError, SkipLog, load_audio, load_image
from tessera.unimodal.protocol import fit_image_area

# Fault injection for tests: a worker process (never the main one) that reaches this "FILE:LINE" of an input
# kills itself with SIGKILL, as the out-of-memory killer would.
KILL_AT_ENV = "TESSERA_TEST_KILL_AT"


@dataclass
class PretokenizeConfig:
    docs_per_shard: int = 4096
    workers: int = 2
    strict: bool = False
    max_audio_seconds: float = 60.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_line_bytes: int = 16 * 2**20  # a longer JSONL line is skipped (line_too_long), never read whole
    max_media_bytes: int = 2**30  # decoded media a worker holds before it encodes them
    allow_outside_paths: bool = False  # read media paths that leave the JSONL file's folder
    device: str = "auto"  # where the codecs run in the workers
    format: str = "auto"  # the inputs' format (tessera.data.readers.FORMATS); auto: from each input's name/layout
    columns: dict = field(default_factory=dict)  # role -> column, tar extension or JSON field (--column)
    text_first: bool = False  # a caption or transcript before its media (default: after)
    split: str | None = None  # the split of a saved Hugging Face DatasetDict (default: train)
    source: str | None = None  # every document's source (default: per input, see docs/data.md)
    min_image_side: int = 0  # an image with a shorter side is filtered out (min_image_side)
    max_aspect_ratio: float = 0.0  # an image longer than this times its width, or wider, is filtered out
    image_max_pixels: int = 0  # images are scaled down to at most this many pixels before encoding (0: no bound)
    dedup: bool = False  # a document whose tokens and mask equal an earlier one's is dropped (duplicate)

    def __post_init__(self):
        counts = {"docs_per_shard": 1, "workers": 1, "max_image_pixels": 1, "max_line_bytes": 1,
                  "max_media_bytes": 1, "min_image_side": 0, "image_max_pixels": 0}
        in_mb = {"max_line_bytes": "--max-line-mb", "max_media_bytes": "--max-media-mb"}  # flags given in MB
        for key, low in counts.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                if key in in_mb:
                    raise ShardError(f"{in_mb[key]} must be positive, got {v!r} bytes")
                raise ShardError(f"--{key.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        if not (isinstance(self.max_audio_seconds, (int, float)) and 0 < self.max_audio_seconds < math.inf):
            raise ShardError(f"--max-audio-seconds must be a finite number > 0, got {self.max_audio_seconds!r}")
        if not (isinstance(self.max_aspect_ratio, (int, float)) and 0 <= self.max_aspect_ratio < math.inf):
            raise ShardError(f"--max-aspect-ratio must be a finite number >= 0 (0: off), "
                             f"got {self.max_aspect_ratio!r}")

    def reader_options(self, chat: dict | None = None) -> ReaderOptions:
        """The readers' options; `chat` is the bundle's chat template, for conversation documents."""
        return ReaderOptions(format=self.format, columns=dict(self.columns), text_first=self.text_first,
                             split=self.split, source=self.source, allow_outside_paths=self.allow_outside_paths,
                             max_line_bytes=self.max_line_bytes, max_member_bytes=self.max_media_bytes, chat=chat)


# settings that change what the documents are: a resumed run (or a part of a distributed one) must share them
READER_KEYS = {"columns": {}, "text_first": False, "split": None, "source": None, "min_image_side": 0,
               "max_aspect_ratio": 0.0, "image_max_pixels": 0, "dedup": False}


class Filtered(Skip):
    """A usable sample that a filter (--min-image-side, --max-aspect-ratio) leaves out: counted apart from
    the bad samples, in the manifest's `filtered`, and never an error under --strict."""


# --------------------------------------------------------------------------------------- chunk planning
fingerprint = file_fingerprint


def plan_chunks(inputs: list[Path], docs_per_shard: int, block: int = 2**20) -> list[tuple[int, int, int, int]]:
    """(input index, byte offset, number of lines, first line number) of every chunk of JSONL files, in input
    order. The files are read in blocks, so a line of any length costs no more memory than a block."""
    return [(fi, *c) for fi, path in enumerate(inputs) for c in plan_lines(path, docs_per_shard, block=block)]


def plan(readers: list[Reader], docs_per_shard: int) -> list[tuple[int, object]]:
    """(reader index, chunk spec) of every chunk of every input, in input order: one shard each."""
    return [(fi, spec) for fi, r in enumerate(readers) for spec in r.plan(docs_per_shard)]


# ------------------------------------------------------------------------------------------- workers
_W: dict = {}


def _init_worker(bundle: str, cfg_dict: dict, inputs: list[tuple[str, str]], local_rank: int = 0,
                 started=None) -> None:
    import torch

    from tessera.tokenizers.bundle import load_bundle
    from tessera.runtime.distributed import resolve_device

    # One thread per worker: parallelism comes from --workers, and the codes do not depend on how many there
    # are (a different thread count can round a codec's float math differently and flip a code).
    torch.set_num_threads(1)
    if started is not None:  # a worker process: Ctrl-C is the main process's to handle (it stops the workers)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = PretokenizeConfig(**cfg_dict)
    if torch.cuda.is_available():  # torchrun rank r encodes on GPU LOCAL_RANK, shared when ranks outnumber GPUs
        local_rank %= torch.cuda.device_count()
    device = resolve_device(cfg.device, local_rank)
    tok = load_bundle(bundle, device=device)
    opts = cfg.reader_options(tok.chat.to_dict())
    _W.update(tok=tok, cfg=cfg, readers=[READERS[f](p, opts) for f, p in inputs],
              cache=CodeCache(), started=started, stats={"peak_media_bytes": 0, "budget_flushes": 0})


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


_Skip = Skip
_UNCACHED = itertools.count()


def _prepare(doc: Document, tok, cfg: PretokenizeConfig, pending) -> tuple[list, dict]:
    """A document's segments -> ([(kind, value, loss)], new media); raises Skip.

    Media are decoded into `new` ({key: (kind, decoded)}) unless their codes are cached or `pending` (the
    chunk's media, `_Media`) already holds them; a media item's value is then its key. A file is keyed by its
    path, size and mtime, bytes from inside a container by their SHA-1.
    """
    items, new = [], {}
    cache = _W.get("cache")
    for kind, value, loss in doc.segments:
        if kind == "text":
            items.append(("text", value, loss))
            continue
        blob = isinstance(value, Blob)
        name = value.name if blob else str(value)
        try:
            if blob:
                key = (kind, "sha1", hashlib.sha1(value.data).hexdigest()) if cache is not None else None
            else:
                key = cache.key(kind, value) if cache is not None and value.is_file() else None
            hit = cache.get(key) if key is not None else None
            if hit is not None:
                items.append((kind + "_codes", hit, loss))
                continue
            if key is not None and (key in pending or key in new):  # decoded for an earlier segment
                items.append((kind, key, loss))
                continue
            source = value.data if blob else value
            if kind == "image":
                if tok.image_codec is None:
                    raise Skip("no_image_codec", "the document has an image but the bundle has no image codec")
                im = load_image(source, max_pixels=cfg.max_image_pixels, name=name)
                if cfg.min_image_side and min(im.size) < cfg.min_image_side:
                    raise Filtered("min_image_side", f"{name}: {im.width}x{im.height} has a side under "
                                                     f"--min-image-side {cfg.min_image_side}")
                if cfg.max_aspect_ratio and max(im.size) > cfg.max_aspect_ratio * min(im.size):
                    raise Filtered("aspect_ratio", f"{name}: {im.width}x{im.height} is more elongated than "
                                                   f"--max-aspect-ratio {cfg.max_aspect_ratio:g}")
                f = tok.image_codec.info.downsample
                if min(im.size) < f:
                    raise Skip("too_small", f"{name}: {im.width}x{im.height} is smaller than one {f}x{f} code")
                info = tok.image_codec.info
                w, h = fit_image_area(im.width, im.height, f, cfg.image_max_pixels, info.max_size)
                grid = tok.layout.max_grid
                if h // f > grid or w // f > grid:
                    raise Skip("grid_too_large", f"{name}: its {h // f}x{w // f} grid is larger than the bundle's "
                                                 f"max_grid {grid}; rebuild the bundle with --max-grid "
                                                 f"{max(h, w) // f} or more")
                if im.size != (w, h):  # the tokenizer would resize it the same way: hold the smaller image
                    im = im.resize((w, h), Image.Resampling.BICUBIC)
                decoded = im
            else:
                if tok.audio_codec is None:
                    raise Skip("no_audio_codec", "the document has audio but the bundle has no audio codec")
                decoded = load_audio(source, sample_rate=tok.audio_codec.info.sample_rate,
                                     max_seconds=cfg.max_audio_seconds, name=name)
                if decoded.num_samples < tok.audio_codec.info.downsample:
                    raise Skip("too_short", f"{name}: {decoded.duration * 1000:.1f} ms is shorter than one frame")
        except Skip:
            raise
        except MediaError as e:
            raise Skip(e.reason, str(e)) from None
        except Exception as e:  # noqa: BLE001 - any failure to decode one file is that file's skip
            raise Skip("decode_error", f"{name}: {type(e).__name__}: {e}") from None
        if key is None:  # not cacheable (the file changed under us): its own entry
            key = (kind, name, "uncached", next(_UNCACHED))
        new[key] = (kind, decoded)
        items.append((kind, key, loss))
    if not items:
        raise Skip("empty", "the document has no content")
    return items, new


def _default_batch(method) -> int:
    return inspect.signature(method).parameters["batch_size"].default


# images / clips of one size the tokenizer encodes at once
IMAGE_BATCH = _default_batch(MultimodalTokenizer.encode_images)
AUDIO_BATCH = _default_batch(MultimodalTokenizer.encode_audios)


class _Media:
    """A chunk's decoded media on their way to codes, in the batches the tokenizer would form.

    The tokenizer batches images of one size and clips of one length, in order of first use. A batch is
    encoded as soon as it is full, so it holds the same media whenever it is encoded; the media still
    waiting are all encoded early only when they pass `budget` bytes, which is what bounds a worker's memory
    (then media of one size that would have shared a batch may not: a codec's float math, and so a code
    at a tie, can depend on the batch). Codes go to `codes` and to the worker's cache.
    """

    def __init__(self, tok, cache: CodeCache, budget: int, stats: dict):
        self.tok, self.cache, self.budget, self.stats = tok, cache, budget, stats
        self.groups: dict[tuple, list] = {}
        self.waiting: dict = {}  # key -> (kind, decoded)
        self.codes: dict = {}
        self.bytes = 0

    def __contains__(self, key) -> bool:
        return key in self.waiting or key in self.codes

    def add(self, new: dict) -> None:
        """Media of one accepted document: {key: (kind, decoded)}."""
        for key, (kind, decoded) in new.items():
            shape = decoded.size if kind == "image" else decoded.num_samples
            group = self.groups.setdefault((kind, shape), [])
            group.append(key)
            self.waiting[key] = (kind, decoded)
            self.bytes += decoded.width * decoded.height * 3 if kind == "image" else int(decoded.waveform.nbytes)
            self.stats["peak_media_bytes"] = max(self.stats["peak_media_bytes"], self.bytes)
            if len(group) == (IMAGE_BATCH if kind == "image" else AUDIO_BATCH):
                self._encode((kind, shape))
        if self.bytes > self.budget:
            self.stats["budget_flushes"] += 1
            self.flush()

    def flush(self) -> None:
        for group in list(self.groups):
            self._encode(group)

    def _encode(self, group: tuple) -> None:
        kind, keys = group[0], self.groups.pop(group)
        batch = [self.waiting.pop(k)[1] for k in keys]
        if kind == "image":
            codes = self.tok.encode_images(batch)  # one batch
            self.bytes -= sum(im.width * im.height * 3 for im in batch)
        else:
            codes = self.tok.encode_audios(batch)  # one batch
            self.bytes -= sum(int(au.waveform.nbytes) for au in batch)
        for key, c in zip(keys, codes):
            self.codes[key] = c
            self.cache.put(key, c)


def _assemble(tok, d: list, codes: dict) -> tuple[np.ndarray, np.ndarray]:
    """A document's items -> (ids `<s> ... </s>`, loss mask)."""
    ids, mask = [tok.bos_id], [0]
    for kind, v, loss in d:
        if kind == "text":
            span = tok.text.encode(v)
        elif kind in ("image", "image_codes"):
            span = tok.image_span(codes[v] if kind == "image" else v)
        else:
            span = tok.audio_span(codes[v] if kind == "audio" else v)
        ids += span
        mask += [int(loss)] * len(span)
    ids.append(tok.eos_id)
    mask.append(1)
    return np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8)


def _encode_chunk(task: tuple[int, tuple[int, object]]) -> dict:
    k, (fi, spec) = task
    started = _W.get("started")
    if started is not None:
        started[k] = 1
    tok, cfg = _W["tok"], _W["cfg"]
    kill_at = os.environ.get(KILL_AT_ENV) if started is not None else None
    reader = _W["readers"][fi]
    skips, filtered = SkipLog(), SkipLog()
    media = _Media(tok, _W["cache"], cfg.max_media_bytes, _W["stats"])
    docs, sources, wheres = [], [], []
    for where, record in reader.records(spec):
        if kill_at == where:
            os.kill(os.getpid(), signal.SIGKILL)
        if record is None:  # a blank line
            continue
        try:
            if isinstance(record, Skip):
                raise record
            items, new = _prepare(record, tok, cfg, media)
        except Filtered as e:
            filtered.add(e.reason, f"{where}: {e}")
            continue
        except Skip as e:
            if cfg.strict:
                raise ShardError(f"{where}: {e} (--strict)") from None
            skips.add(e.reason, f"{where}: {e}")
            continue
        media.add(new)
        docs.append(items)
        sources.append(record.source or reader.default_source)
        wheres.append(where)
    media.flush()
    toks, masks = zip(*(_assemble(tok, d, media.codes) for d in docs)) if docs else ((), ())
    offsets = np.cumsum([0] + [len(t) for t in toks])
    if started is not None:
        started[k] = 2
    return {
        "tokens": np.concatenate(toks) if toks else np.zeros(0, np.uint32),
        "mask": np.concatenate(masks) if masks else np.zeros(0, np.uint8),
        "index": offsets.astype(np.uint64),
        "sources": sources,
        "wheres": wheres,
        "skips": skips.to_dict(),
        "filtered": filtered.to_dict(),
        "lines": reader.size(spec),
    }


# ------------------------------------------------------------------------------------------ duplicates
def _digests(tokens: np.ndarray, mask: np.ndarray, index: np.ndarray) -> list[bytes]:
    """A 128-bit BLAKE2 digest of each document's tokens and loss mask: its content, for --dedup."""
    out = []
    for a, b in zip(index[:-1].astype(np.int64), index[1:].astype(np.int64)):
        h = hashlib.blake2b(tokens[a:b].tobytes(), digest_size=16)
        h.update(mask[a:b].tobytes())
        out.append(h.digest())
    return out


def _seen(out: Path, shards: list[dict]) -> set[bytes]:
    """The digests of the documents of shards already written (a resumed --dedup run)."""
    seen: set[bytes] = set()
    for s in shards:
        arrays = {x: np.fromfile(out / f"{s['name']}.{x}", dtype=SUFFIXES[x]) for x in ("tokens", "mask", "index")}
        seen.update(_digests(arrays["tokens"], arrays["mask"], arrays["index"]))
    return seen


def _keep(keep: np.ndarray, tokens: np.ndarray, mask: np.ndarray, index: np.ndarray):
    """The documents where `keep` is true: (tokens, mask, index)."""
    index = index.astype(np.int64)
    spans = [(a, b) for a, b, k in zip(index[:-1], index[1:], keep) if k]
    if not spans:
        return np.zeros(0, tokens.dtype), np.zeros(0, mask.dtype), np.zeros(1, np.uint64)
    sel = np.concatenate([np.arange(a, b) for a, b in spans])
    new_index = np.cumsum([0] + [b - a for a, b in spans]).astype(np.uint64)
    return tokens[sel], mask[sel], new_index


def _drop_duplicates(res: dict, seen: set[bytes], filtered: SkipLog) -> None:
    """Remove from a chunk's result the documents whose content was seen before (in chunk order)."""
    keep = np.ones(len(res["index"]) - 1, dtype=bool)
    for i, d in enumerate(_digests(res["tokens"], res["mask"], res["index"])):
        if d in seen:
            keep[i] = False
            filtered.add("duplicate", f"{res['wheres'][i]}: the same tokens as an earlier document")
        else:
            seen.add(d)
    if keep.all():
        return
    res["tokens"], res["mask"], res["index"] = _keep(keep, res["tokens"], res["mask"], res["index"])
    res["sources"] = [s for s, k in zip(res["sources"], keep) if k]
    res["wheres"] = [w for w, k in zip(res["wheres"], keep) if k]


class _WorkerDied(Exception):
    pass


class _Workers:
    """Chunk results in input order from worker processes. Every wait ends: a worker that dies (SIGKILL from
    the out-of-memory killer, a segfault) breaks the pool, and the wait for its chunk raises `_WorkerDied`
    naming the chunks that were being encoded."""

    def __init__(self, n: int, init_args: tuple, todo: list, readers: list[Reader]):
        ctx = mp.get_context("spawn")
        self.started = ctx.RawArray("b", max(1, len(todo)))  # per chunk: 1 while a worker encodes it, then 2
        self.todo, self.readers, self.ahead = todo, readers, 2 * n
        self.pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(*init_args, self.started))

    def results(self):
        pending: deque = deque()
        submitted = 0
        try:
            while submitted < len(self.todo) or pending:
                while submitted < len(self.todo) and len(pending) < self.ahead:
                    pending.append(self.pool.submit(_encode_chunk, (submitted, self.todo[submitted])))
                    submitted += 1
                res = pending.popleft().result()
                yield res
        except BrokenProcessPool:
            raise _WorkerDied(self._in_progress()) from None

    def _in_progress(self) -> str:
        names = []
        for k, (fi, spec) in enumerate(self.todo):
            if self.started[k] == 1:
                names.append(self.readers[fi].describe(spec))
        if not names:
            return "starting up (loading the tokenizer bundle)"
        return "encoding " + (names[0] if len(names) == 1 else "one of " + ", ".join(names))

    def close(self, ok: bool) -> None:
        if ok:
            self.pool.shutdown(wait=True)
            return
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # workers still encoding would otherwise finish their chunks first
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)


# ------------------------------------------------------------------------------------------ main loop
PART_PREFIX = "part-"


def part_dir(out: Path, rank: int) -> Path:
    """Where rank `rank` of a distributed pretokenization writes its shards."""
    return Path(out) / f"{PART_PREFIX}{rank:05d}"


def _parts(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(f"{PART_PREFIX}*") if p.is_dir()) if out.is_dir() else []


def _check_disposable(out: Path, inputs: list[Path]) -> None:
    """`--force` deletes `out`: only a shard set (or an empty directory, or the parts of a distributed run),
    and never one holding an input."""
    root = out.resolve()
    for p in inputs:
        if p.resolve().is_relative_to(root):
            raise ShardError(f"--out {out} holds the input {p}; --force would delete it: choose another --out")
    if not out.is_dir():
        raise ShardError(f"--out {out} is not a directory")
    parts = set(_parts(out))
    if (any(p.name != LOCK_NAME and p not in parts for p in out.iterdir())
            and not (out / "manifest.json").is_file()):
        raise ShardError(f"--out {out} is not a shard set (no manifest.json) and is not empty; --force only "
                         f"replaces a shard set: choose another --out")
    for p in parts:
        if any(q.name != LOCK_NAME for q in p.iterdir()) and not (p / "manifest.json").is_file():
            raise ShardError(f"--out {out}: {p.name} is not a part of a shard set; --force only replaces a shard "
                             f"set: choose another --out")


def _clear(out: Path) -> None:
    """Empty `out`, all but the lock this run holds on it."""
    for p in out.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) that torchrun sets in the environment; (0, 1, 0) without it."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise TesseraError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None


def pretokenize(bundle: str | Path, inputs: list[str | Path], out: str | Path,
                cfg: PretokenizeConfig | None = None, force: bool = False, progress: bool = True,
                rank: int = 0, world_size: int = 1, local_rank: int = 0, merge: bool = True) -> dict:
    """Pretokenize `inputs` into the shard set `out`, and return its manifest.

    With `world_size` > 1 this process is rank `rank` of a distributed run: it encodes chunks k with
    k % world_size == rank into `out/part-RANK/` (a shard set of its own, that resumes on its own) and returns
    that part's manifest; then, with `merge`, the last rank to finish writes the merged shard set into `out`
    (`merge_parts`), the one the loader reads. `--force` then clears only this rank's part.
    """
    cfg = cfg or PretokenizeConfig()
    out, bundle = Path(out), Path(bundle)
    if world_size < 1 or not 0 <= rank < world_size:
        raise TesseraError(f"--rank {rank} is not in [0, --world-size {world_size})")
    spec = read_bundle_spec(bundle)
    readers = open_readers(inputs, cfg.reader_options(spec.get("chat")))
    paths = [Path(p) for p in inputs]
    for p in paths:
        if p.is_dir() and out.resolve().is_relative_to(p.resolve()):
            raise ShardError(f"--out {out} is inside the input folder {p}: choose an --out outside it")
    target = out if world_size == 1 else part_dir(out, rank)
    if world_size > 1 and (out / "manifest.json").is_file() and "parts" not in read_manifest(out):
        raise ShardError(f"{out} holds the shards of a one-process run; a distributed run (--world-size "
                         f"{world_size}) writes its parts beside a merged manifest: use another --out")
    if world_size == 1 and not (out / "manifest.json").is_file() and _parts(out) and not force:
        raise ShardError(f"{out} holds the parts of a distributed run ({', '.join(p.name for p in _parts(out))}) "
                         f"but no merged manifest: finish them and run `tessera data pretokenize-merge {out}`, or "
                         f"use --force to start over with one process")
    if force and target.exists():
        _check_disposable(target, paths + [bundle])  # before the lock file is made in a directory of the user's
    target.mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(target)  # before anything in `target` is read or replaced
    try:
        if force:
            _check_disposable(target, paths + [bundle])
            _clear(target)
        manifest = _pretokenize(spec, bundle, readers, target, cfg, progress, rank, world_size, local_rank)
    finally:
        lock.release()
    if world_size > 1 and merge:
        merged = merge_parts(out, wait=600.0, quiet=True, progress=progress)
        if merged is not None:
            manifest = {**manifest, "merged": True}
    return manifest


def _check_resumable(out: Path, manifest: dict, spec: dict, bundle: Path, prints: list, cfg: PretokenizeConfig,
                     part: dict | None) -> None:
    if manifest["tokenizer_hash"] != spec["hash"]:
        raise ShardError(
            f"{out} was tokenized with bundle {manifest['tokenizer_hash'][:12]}, not {spec['hash'][:12]} "
            f"({bundle}); shards never mix tokenizers: use another --out, or --force to start over"
        )
    same = (manifest["inputs"] == prints and manifest["config"]["docs_per_shard"] == cfg.docs_per_shard
            and all(manifest["config"].get(k, v) == getattr(cfg, k) for k, v in READER_KEYS.items()))
    if not same:
        raise ShardError(f"{out} was made from other inputs or settings; use another --out, or --force to start over")
    had = manifest.get("part", {})
    if part is not None and {k: had.get(k) for k in ("rank", "world_size")} != part:
        raise ShardError(f"{out} is part {had.get('rank')} of {had.get('world_size')}, not part {part['rank']} of "
                         f"{part['world_size']}; use another --out, or --force to start over")


def _pretokenize(spec: dict, bundle: Path, readers: list[Reader], out: Path, cfg: PretokenizeConfig,
                 progress: bool, rank: int = 0, world: int = 1, local_rank: int = 0) -> dict:
    layout = VocabLayout.from_dict(spec["layout"])
    prints = [r.fingerprint() for r in readers]
    part = {"rank": rank, "world_size": world} if world > 1 else None
    chunks = plan(readers, cfg.docs_per_shard)  # first: a column that is not there stops the run before it starts
    if (out / "manifest.json").exists():
        manifest = read_manifest(out)
        _check_resumable(out, manifest, spec, bundle, prints, cfg, part)
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
            "skipped": SkipLog().to_dict(), "filtered": SkipLog().to_dict(),
            "image_policy": _image_policy(bundle, cfg), "complete": False,
        }
        if part is not None:
            manifest["part"] = dict(part)
        write_manifest(out, manifest)
    mine = [k for k in range(len(chunks)) if k % world == rank]  # chunk k is rank k % world's
    if part is not None:
        manifest["part"]["chunks"] = len(chunks)
    done = len(manifest["shards"])
    todo = [chunks[k] for k in mine[done:]]
    modality = layout.modality_table()
    skips, filtered = SkipLog(), SkipLog()
    skips.merge(manifest["skipped"])
    filtered.merge(manifest.get("filtered", {}))
    seen = _seen(out, manifest["shards"]) if cfg.dedup else None
    n_lines = sum(readers[fi].size(c) for fi, c in todo)
    workers = max(1, cfg.workers)
    init_args = (str(bundle), asdict(cfg), [(r.format, str(r.path)) for r in readers], local_rank)
    t0 = time.perf_counter()
    new_tokens = 0
    bar = progress_bar(total=n_lines, desc="pretokenize" if part is None else f"pretokenize part {rank}/{world}",
                       unit="doc", disable=not progress)
    threads = torch.get_num_threads()
    pool, ok = None, False
    try:
        if workers == 1:
            _init_worker(*init_args)
            results = map(_encode_chunk, enumerate(todo))
        else:
            pool = _Workers(workers, init_args, todo, readers)
            results = pool.results()
        for i, res in enumerate(results, start=done):
            name = f"shard_{i:05d}"
            filtered.merge(res["filtered"])
            if seen is not None:
                _drop_duplicates(res, seen, filtered)
            src_ids = []
            for s in res["sources"]:
                if s not in manifest["sources"]:
                    manifest["sources"].append(s)
                src_ids.append(manifest["sources"].index(s))
            write_shard(out, name, res["tokens"], res["index"], res["mask"], np.asarray(src_ids, np.uint16))
            n_docs = len(res["index"]) - 1
            entry = {"name": name, "docs": n_docs, "tokens": int(len(res["tokens"]))}
            if part is not None:
                entry["chunk"] = mine[i]
            manifest["shards"].append(entry)
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
            manifest["filtered"] = filtered.to_dict()
            write_manifest(out, manifest)
            new_tokens += len(res["tokens"])
            bar.update(res["lines"])
            dt = max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(docs_s=f"{bar.n / dt:.0f}", tok_s=f"{new_tokens / dt:.0f}", skipped=skips.total,
                            filtered=filtered.total, refresh=False)
        ok = True
    except _WorkerDied as e:
        n = len(manifest["shards"])
        raise ShardError(
            f"a worker process died while {e} (killed by the system, often for lack of memory, or crashed); "
            f"the {n} shard(s) before it are kept in {out}: run the same command again to resume (with fewer "
            f"--workers or a smaller --max-media-mb if memory is short)"
        ) from None
    finally:
        bar.close()
        torch.set_num_threads(threads)
        if pool is not None:
            pool.close(ok)
    write_source_index(out, manifest)
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    write_manifest(out, manifest)
    return manifest


def _image_policy(bundle: Path, cfg: PretokenizeConfig) -> dict | None:
    """How images are sized before encoding, from the bundle's image codec and the settings."""
    try:
        info = read_json(bundle / "image" / "codec.json")["info"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no image codec in the bundle
    return {"factor": info["downsample"], "max_side": info.get("max_size") or None,
            "max_pixels": cfg.image_max_pixels or None, "aspect_ratio": "kept",
            "rounding": "each side to the nearest multiple of factor (down, when max_pixels scales it)",
            "resample": "bicubic", "min_side": cfg.min_image_side or None,
            "max_aspect_ratio": cfg.max_aspect_ratio or None}


# --------------------------------------------------------------------------------------------- merging
def _link(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content: a hard link (no copy) where the file system allows one, else a copy."""
    tmp = _temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def merge_parts(out: str | Path, *, wait: float = 0.0, quiet: bool = False, progress: bool = True) -> dict | None:
    """Write the shard set `out` from the parts `out/part-*/` of a distributed pretokenization.

    Shard k of the merged set is chunk k of the inputs, whichever part encoded it: its tokens, offsets and mask
    are hard links to the part's files (copies where links are impossible) and its sources are renumbered in
    order of first appearance, so the merged set is the one a single process writes, file for file. Token and
    skip counts are the parts' sums (skip examples from the parts in rank order). With `quiet`, parts that are
    missing or unfinished return None instead of raising: another rank will merge when it finishes.
    """
    out = Path(out)
    parts = _parts(out)
    if not parts:
        raise ShardError(f"{out} holds no parts ({PART_PREFIX}NNNNN/) of a distributed pretokenize")
    lock = lock_output_dir(out, "tessera data pretokenize-merge", wait=wait)
    try:
        return _merge(out, parts, quiet, progress)
    finally:
        lock.release()


def _merge(out: Path, parts: list[Path], quiet: bool, progress: bool) -> dict | None:
    found: dict[int, tuple[Path, dict]] = {}
    for p in parts:
        if not (p / "manifest.json").is_file():
            continue  # a rank that has not started writing
        m = read_manifest(p)
        if "part" not in m:
            raise ShardError(f"{p}: not a part of a distributed pretokenize (its manifest names no rank)")
        found[m["part"]["rank"]] = (p, m)
    if not found:
        if quiet:
            return None
        raise ShardError(f"{out}: no part has started; run the ranks first")
    ref = found[min(found)][1]
    world = ref["part"]["world_size"]
    for r, (p, m) in found.items():
        for key in ("tokenizer_hash", "inputs"):
            if m[key] != ref[key]:
                raise ShardError(f"{p} and {found[min(found)][0]} differ in {key}: parts of different runs")
        if m["part"]["world_size"] != world or m["config"]["docs_per_shard"] != ref["config"]["docs_per_shard"] or \
                any(m["config"].get(k, v) != ref["config"].get(k, v) for k, v in READER_KEYS.items()):
            raise ShardError(f"{p} and {found[min(found)][0]} differ in their settings: parts of different runs")
    waiting = [r for r in range(world) if r not in found or not found[r][1].get("complete")]
    if waiting:
        if quiet:
            if progress:
                print(f"{out}: parts {', '.join(map(str, waiting))} of {world} are not finished; the last rank to "
                      f"finish merges them (or run `tessera data pretokenize-merge {out}`)")
            return None
        raise ShardError(f"{out}: parts {', '.join(map(str, waiting))} of {world} are not finished: run those ranks "
                         f"(the same command with --rank R --world-size {world}) to completion, then merge")
    n_chunks = ref["part"]["chunks"]
    by_chunk = {}
    for r in range(world):
        p, m = found[r]
        if m["part"]["chunks"] != n_chunks:
            raise ShardError(f"{p} planned {m['part']['chunks']} chunks, {found[0][0]} {n_chunks}: the inputs changed")
        for s in m["shards"]:
            by_chunk[s["chunk"]] = (p, m, s)
    if sorted(by_chunk) != list(range(n_chunks)):
        raise ShardError(f"{out}: the parts hold {len(by_chunk)} of {n_chunks} chunks")
    summary = [{"dir": found[r][0].name, "rank": r, "shards": len(found[r][1]["shards"]), "docs": found[r][1]["docs"],
                "seconds": found[r][1].get("seconds")} for r in range(world)]
    if (out / "manifest.json").is_file():
        old = read_manifest(out)
        if "parts" not in old:
            raise ShardError(f"{out} holds the shards of a one-process run: the parts cannot be merged into it")
        if old.get("complete") and [(x["dir"], x["shards"], x["docs"]) for x in old["parts"]] == \
                [(x["dir"], x["shards"], x["docs"]) for x in summary] and old["inputs"] == ref["inputs"] and \
                old["config"] == ref["config"] and old["tokenizer_hash"] == ref["tokenizer_hash"]:
            return old  # merged already
    merged = {
        "format": SHARDS_FORMAT, "version": SHARDS_VERSION, "tokenizer_hash": ref["tokenizer_hash"],
        "layout": ref["layout"], "bundle": ref["bundle"], "inputs": ref["inputs"], "config": ref["config"],
        "shards": [], "sources": [], "docs": 0, "lines": 0,
        "tokens": {"total": 0, **{m: 0 for m in MODALITIES}}, "tokens_by_source": {},
        "skipped": SkipLog().to_dict(), "filtered": SkipLog().to_dict(), "image_policy": ref.get("image_policy"),
        "complete": False, "parts": summary,
    }
    skips, filtered = SkipLog(), SkipLog()
    for r in range(world):
        m = found[r][1]
        merged["docs"] += m["docs"]
        merged["lines"] += m["lines"]
        for key in merged["tokens"]:
            merged["tokens"][key] += m["tokens"][key]
        skips.merge(m["skipped"])
        filtered.merge(m.get("filtered", {}))
    # --dedup: each part dropped the repeats within itself; the repeats across parts go here, in chunk order
    seen = set() if ref["config"].get("dedup") else None
    modality = VocabLayout.from_dict(ref["layout"]).modality_table()
    by_source: list[int] = []
    for k in range(n_chunks):
        p, m, s = by_chunk[k]
        name = f"shard_{k:05d}"
        local = np.fromfile(p / f"{s['name']}.source", dtype=np.uint16).astype(np.int64)
        index = np.fromfile(p / f"{s['name']}.index", dtype=np.uint64)
        keep = np.ones(len(local), dtype=bool)
        if seen is not None:
            tokens = np.fromfile(p / f"{s['name']}.tokens", dtype=np.uint32)
            mask = np.fromfile(p / f"{s['name']}.mask", dtype=np.uint8)
            for i, d in enumerate(_digests(tokens, mask, index)):
                keep[i] = d not in seen
                seen.add(d)
        if keep.all():
            for suffix in ("tokens", "index", "mask"):
                _link(p / f"{s['name']}.{suffix}", out / f"{name}.{suffix}")
        else:
            dropped = ~keep
            a, b = index[:-1].astype(np.int64), index[1:].astype(np.int64)
            gone = np.concatenate([tokens[x:y] for x, y in zip(a[dropped], b[dropped])]).astype(np.int64)
            counts = np.bincount(modality[gone], minlength=len(MODALITIES))
            merged["docs"] -= int(dropped.sum())
            merged["tokens"]["total"] -= len(gone)
            for mod, c in zip(MODALITIES, counts):
                merged["tokens"][mod] -= int(c)
            for i in np.nonzero(dropped)[0]:
                filtered.add("duplicate", f"{p.name}/{s['name']} document {i}: the same tokens as an earlier "
                                          f"document of another part")
            tokens, mask, index = _keep(keep, tokens, mask, index)
            local = local[keep]
            for suffix, arr in (("tokens", tokens), ("index", index), ("mask", mask)):
                _atomic_array(out / f"{name}.{suffix}", arr.astype(SUFFIXES[suffix]))
        mapping = np.zeros(len(m["sources"]), np.int64)
        _, first = np.unique(local, return_index=True)
        for i in local[np.sort(first)]:  # sources new to the merged set, in order of first appearance
            src = m["sources"][i]
            if src not in merged["sources"]:
                merged["sources"].append(src)
                by_source.append(0)
            mapping[i] = merged["sources"].index(src)
        ids = mapping[local]
        _atomic_array(out / f"{name}.source", ids.astype(SUFFIXES["source"]))
        for g, length in zip(ids, np.diff(index.astype(np.int64))):
            by_source[g] += int(length)
        merged["shards"].append({"name": name, "docs": len(ids), "tokens": int(index[-1])})
    merged["filtered"] = filtered.to_dict()
    merged["skipped"] = skips.to_dict()
    merged["tokens_by_source"] = dict(zip(merged["sources"], by_source))
    keep = {f"{s['name']}.{x}" for s in merged["shards"] for x in SUFFIXES}
    for f in out.glob("shard_*"):  # shards of an earlier merge of more chunks
        if f.is_file() and f.name not in keep:
            f.unlink()
    for f in out.glob("source_*.docs"):
        if int(f.name[7:11]) >= len(merged["sources"]):
            f.unlink()
    write_source_index(out, merged)
    merged["complete"] = True
    write_manifest(out, merged)
    if progress:
        print(f"{out}: merged {world} parts, {merged['docs']} documents in {n_chunks} shard(s)")
    return merged


# ------------------------------------------------------------------------------------------------ CLI
def _parse_columns(items: list[str] | None) -> dict:
    cols = {}
    for item in items or []:
        role, eq, name = item.partition("=")
        if not eq or not name or role not in ROLES:
            raise TesseraError(f"--column {item!r}: give ROLE=NAME with ROLE one of {', '.join(ROLES)}")
        cols[role] = name
    return cols


def add_pretokenize_arguments(p) -> None:
    p.add_argument("--tokenizer", required=True, metavar="BUNDLE")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="documents.jsonl, tar shards, Parquet files, a saved Hugging Face dataset, a folder of "
                        "images with .txt captions, a LibriSpeech folder or a Common Voice TSV (docs/data.md)")
    p.add_argument("--out", required=True, metavar="SHARDS")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="the inputs' format (auto: from each input's name or layout)")
    p.add_argument("--column", action="append", metavar="ROLE=NAME",
                   help=f"the column (Parquet, Arrow, TSV), member extension (tar) or JSON field of a role "
                        f"({', '.join(ROLES)}); repeat for several")
    p.add_argument("--text-first", action="store_true",
                   help="put a caption or transcript before its image or audio (default: after)")
    p.add_argument("--split", help="the split of a saved Hugging Face DatasetDict (default: train)")
    p.add_argument("--source", help="the source name of every document (default: per input; see docs/data.md)")
    p.add_argument("--min-image-side", type=int, default=0, metavar="PX",
                   help="leave out images with a side shorter than PX pixels (counted as filtered: min_image_side)")
    p.add_argument("--max-aspect-ratio", type=float, default=0.0, metavar="R",
                   help="leave out images whose longer side exceeds R times the shorter (filtered: aspect_ratio)")
    p.add_argument("--image-max-pixels", type=int, default=0, metavar="N",
                   help="scale images down (aspect ratio kept) to at most N pixels before encoding, each side a "
                        "multiple of the codec's factor (default: the codec's own size bound only)")
    p.add_argument("--dedup", action="store_true",
                   help="drop a document whose tokens and mask equal an earlier one's (filtered: duplicate)")
    p.add_argument("--workers", type=int, default=PretokenizeConfig.workers)
    p.add_argument("--docs-per-shard", type=int, default=PretokenizeConfig.docs_per_shard)
    p.add_argument("--max-audio-seconds", type=float, default=PretokenizeConfig.max_audio_seconds,
                   help="longer clips are refused (counted as too_long)")
    p.add_argument("--max-line-mb", type=float, default=PretokenizeConfig.max_line_bytes / 2**20,
                   help="longer JSONL lines are skipped (counted as line_too_long)")
    p.add_argument("--max-media-mb", type=float, default=PretokenizeConfig.max_media_bytes / 2**20,
                   help="decoded media a worker holds before encoding them (bounds each worker's memory); also "
                        "the largest tar member read")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="read media paths that leave the input's folder (absolute, ../, symlinks out)")
    p.add_argument("--device", default="auto", help="where codecs run: auto, cpu or cuda")
    p.add_argument("--rank", type=int, default=None,
                   help="this process's part of a distributed run (default: $RANK, as torchrun sets it, or 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="the number of processes of a distributed run (default: $WORLD_SIZE, or 1)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.add_argument("--force", action="store_true",
                   help="discard an existing shard set in --out (in a distributed run: this rank's part) and "
                        "start over")


def run_pretokenize(args) -> int:
    for flag in ("max_line_mb", "max_media_mb"):
        if not getattr(args, flag) > 0:
            raise TesseraError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.docs_per_shard < 1:
        raise TesseraError(f"--docs-per-shard must be >= 1, got {args.docs_per_shard}")
    for flag in ("min_image_side", "image_max_pixels"):
        if getattr(args, flag) < 0:
            raise TesseraError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.max_aspect_ratio and not args.max_aspect_ratio >= 1:
        raise TesseraError(f"--max-aspect-ratio must be >= 1 (or 0: off), got {args.max_aspect_ratio}")
    env_rank, env_world, local_rank = distributed_env()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world_size is None else args.world_size
    cfg = PretokenizeConfig(docs_per_shard=args.docs_per_shard, workers=args.workers, strict=args.strict,
                            max_audio_seconds=args.max_audio_seconds, max_line_bytes=int(args.max_line_mb * 2**20),
                            max_media_bytes=int(args.max_media_mb * 2**20),
                            allow_outside_paths=args.allow_outside_paths, device=args.device, format=args.format,
                            columns=_parse_columns(args.column), text_first=args.text_first, split=args.split,
                            source=args.source, min_image_side=args.min_image_side,
                            max_aspect_ratio=args.max_aspect_ratio, image_max_pixels=args.image_max_pixels,
                            dedup=args.dedup)
    m = pretokenize(args.tokenizer, args.input, args.out, cfg, force=args.force, rank=rank, world_size=world,
                    local_rank=local_rank)
    t = m["tokens"]
    where = args.out if world == 1 else part_dir(Path(args.out), rank)
    print(f"{m['docs']} documents, {t['total']} tokens (text {t['text']}, image {t['image']}, audio {t['audio']}) "
          f"in {len(m['shards'])} shard(s) -> {where}")
    sk = m["skipped"]
    if sk["total"]:
        print(f"skipped {sk['total']}: " + ", ".join(f"{k}={v}" for k, v in sk["counts"].items())
              + f" (details in {Path(where) / 'manifest.json'})")
    fl = m.get("filtered", {})
    if fl.get("total"):
        print(f"filtered {fl['total']}: " + ", ".join(f"{k}={v}" for k, v in fl["counts"].items()))
    return 0


def add_pretokenize_merge_arguments(p) -> None:
    p.add_argument("out", metavar="SHARDS", help="the --out of a distributed pretokenize, holding part-*/")


def run_pretokenize_merge(args) -> int:
    m = merge_parts(args.out, progress=False)
    t = m["tokens"]
    print(f"{args.out}: {len(m['parts'])} parts merged: {m['docs']} documents, {t['total']} tokens (text "
          f"{t['text']}, image {t['image']}, audio {t['audio']}) in {len(m['shards'])} shard(s)")
    for what in ("skipped", "filtered"):
        if m.get(what, {}).get("total"):
            print(f"{what} {m[what]['total']}: " + ", ".join(f"{k}={v}" for k, v in m[what]["counts"].items()))
    return 0
