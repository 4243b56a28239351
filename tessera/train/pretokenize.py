"""`tessera data pretokenize`: documents.jsonl -> token shards, with several worker processes.

Documents (DESIGN.md): one JSON object per line,
    {"segments": [{"text": "a drawing of"}, {"image": "img/7.png"}, {"audio": "wav/7.wav", "loss": false}],
     "source": "digits"}
with media paths relative to the JSONL file. Each document becomes `<s> ...segments... </s>`; a segment
with `"loss": false` is context only (its tokens get mask 0). The source (default: the file's stem) feeds
mixture weights in the loader.

Media paths are resolved relative to the JSONL file's folder and must stay inside it, symlinks resolved
(`../x.png`, an absolute path, or a link that leaves the folder is a skip: `outside_root`), unless
`--allow-outside-paths` names the corpus as trusted.

The inputs are cut into chunks of `docs_per_shard` lines; each worker process (one intra-op thread each)
loads the tokenizer bundle once and turns a chunk into one shard, encoding the chunk's images and clips in
batches (on CUDA when it is available). A batch is encoded as soon as it is full; decoded media waiting
for their batch are all encoded at once when they pass `max_media_bytes` (`--max-media-mb`), so a worker's
memory does not grow with the chunk (see `_Media`). Shards are written in input order whatever the
workers' timing, so the output is the same for any number of workers. A worker that dies (the out-of-memory
killer, a crash) ends the run with one line naming the lines it was encoding; the shards already written are
kept, and running the same command again resumes.

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

import inspect
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tessera.tokenizers.bundle import read_bundle_spec
from tessera.tokenizers.layout import MODALITIES, VocabLayout
from tessera.tokenizers.multimodal import MultimodalTokenizer
from tessera.train.monitor import progress_bar
from tessera.train.shards import (LOCK_NAME, SHARDS_FORMAT, SHARDS_VERSION, ShardError, lock_output_dir,
                                  read_manifest, write_manifest, write_shard, write_source_index)
from tessera.unimodal.media import DEFAULT_MAX_PIXELS, MediaError, SkipLog, load_audio, load_image

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


# --------------------------------------------------------------------------------------- chunk planning
def fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_chunks(inputs: list[Path], docs_per_shard: int, block: int = 2**20) -> list[tuple[int, int, int, int]]:
    """(input index, byte offset, number of lines, first line number) of every chunk, in input order.

    The files are read in blocks, so a line of any length costs no more memory than a block.
    """
    chunks = []
    for fi, path in enumerate(inputs):
        start, n, first, offset, line_end = 0, 0, 1, 0, 0
        with open(path, "rb") as f:
            while data := f.read(block):
                j = data.find(b"\n")
                while j >= 0:
                    n += 1
                    line_end = offset + j + 1
                    if n == docs_per_shard:
                        chunks.append((fi, start, n, first))
                        start, first, n = line_end, first + n, 0
                    j = data.find(b"\n", j + 1)
                offset += len(data)
        if offset > line_end:  # a last line without a newline
            n += 1
        if n:
            chunks.append((fi, start, n, first))
    return chunks


# ------------------------------------------------------------------------------------------- workers
_W: dict = {}


def _init_worker(bundle: str, cfg_dict: dict, inputs: list[str], started=None) -> None:
    import torch

    from tessera.tokenizers.bundle import load_bundle
    from tessera.train.distributed import resolve_device

    # One thread per worker: parallelism comes from --workers, and the codes do not depend on how many there
    # are (a different thread count can round a codec's float math differently and flip a code).
    torch.set_num_threads(1)
    if started is not None:  # a worker process: Ctrl-C is the main process's to handle (it stops the workers)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = PretokenizeConfig(**cfg_dict)
    device = resolve_device(cfg.device)
    _W.update(tok=load_bundle(bundle, device=device), cfg=cfg, inputs=[Path(p) for p in inputs], cache=CodeCache(),
              started=started, stats={"peak_media_bytes": 0, "budget_flushes": 0})


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


_UNCACHED = itertools.count()


def _show(value: str, n: int = 120) -> str:
    return value if len(value) <= n else value[:n] + "..."


def _parse(line: bytes, base: Path, root: Path, tok, cfg: PretokenizeConfig, pending) -> tuple[list, str | None, dict]:
    """A document line -> ([(kind, value, loss)], source, new media); raises _Skip.

    Media are decoded into `new` ({key: (kind, decoded)}) unless their codes are cached or `pending` (the
    chunk's media, `_Media`) already holds them; a media item's value is then its key.
    """
    try:
        return _parse_doc(line, base, root, tok, cfg, pending)
    except RecursionError:  # from the parser, or from printing a deeply nested segment in a message
        raise _Skip("bad_json", "nested too deep for the JSON parser") from None


def _parse_doc(line: bytes, base: Path, root: Path, tok, cfg: PretokenizeConfig, pending) -> tuple[list, str | None, dict]:
    try:
        doc = json.loads(line)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise _Skip("bad_json", f"not valid JSON: {str(e).split(';')[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
        raise _Skip("no_segments", "a document needs a 'segments' list")
    source = doc.get("source")
    if source is not None and not isinstance(source, str):
        raise _Skip("bad_segment", "'source' must be a string")
    items, new = [], {}
    for seg in doc["segments"]:
        kinds = [k for k in ("text", "image", "audio") if isinstance(seg, dict) and k in seg]
        if len(kinds) != 1:
            raise _Skip("bad_segment", f"a segment needs exactly one of text/image/audio: {_show(repr(seg), 80)}")
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
        if not cfg.allow_outside_paths:
            try:
                inside = path.resolve().is_relative_to(root)
            except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a symlink loop
                raise _Skip("bad_segment", f"{_show(value)!r} is not a usable path ({e})") from None
            if not inside:
                raise _Skip("outside_root", f"{_show(value)}: path outside the data root {root} "
                                            f"(--allow-outside-paths reads it)")
        cache = _W.get("cache")
        try:
            key = cache.key(kind, path) if cache is not None and path.is_file() else None
            hit = cache.get(key) if key is not None else None
            if hit is not None:
                items.append((kind + "_codes", hit, loss))
                continue
            if key is not None and (key in pending or key in new):  # decoded for an earlier segment
                items.append((kind, key, loss))
                continue
            if kind == "image":
                if tok.image_codec is None:
                    raise _Skip("no_image_codec", "the document has an image but the bundle has no image codec")
                im = load_image(path, max_pixels=cfg.max_image_pixels)
                f = tok.image_codec.info.downsample
                if min(im.size) < f:
                    raise _Skip("too_small", f"{path}: {im.width}x{im.height} is smaller than one {f}x{f} code")
                w, h = tok.image_size_for(im)
                grid = tok.layout.max_grid
                if h // f > grid or w // f > grid:
                    raise _Skip("grid_too_large", f"{path}: its {h // f}x{w // f} grid is larger than the bundle's "
                                                  f"max_grid {grid}; rebuild the bundle with --max-grid "
                                                  f"{max(h, w) // f} or more")
                if im.size != (w, h):  # the tokenizer would resize it the same way: hold the smaller image
                    im = im.resize((w, h), Image.Resampling.BICUBIC)
                decoded = im
            else:
                if tok.audio_codec is None:
                    raise _Skip("no_audio_codec", "the document has audio but the bundle has no audio codec")
                decoded = load_audio(path, sample_rate=tok.audio_codec.info.sample_rate,
                                     max_seconds=cfg.max_audio_seconds)
                if decoded.num_samples < tok.audio_codec.info.downsample:
                    raise _Skip("too_short", f"{path}: {decoded.duration * 1000:.1f} ms is shorter than one frame")
        except _Skip:
            raise
        except MediaError as e:
            raise _Skip(e.reason, str(e)) from None
        except Exception as e:  # noqa: BLE001 - any failure to decode one file is that file's skip
            raise _Skip("decode_error", f"{path}: {type(e).__name__}: {e}") from None
        if key is None:  # not cacheable (the file changed under us): its own entry
            key = (kind, str(path), "uncached", next(_UNCACHED))
        new[key] = (kind, decoded)
        items.append((kind, key, loss))
    if not items:
        raise _Skip("empty", "the document has no content")
    return items, source, new


def _read_line(f, limit: int) -> tuple[bytes, bool]:
    """The next line, or (b"", True) after skipping past a line longer than `limit` bytes."""
    line = f.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, False
    while line and not line.endswith(b"\n"):
        line = f.readline(2**20)
    return b"", True


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


def _encode_chunk(task: tuple[int, tuple[int, int, int, int]]) -> dict:
    k, (fi, start, n, first) = task
    started = _W.get("started")
    if started is not None:
        started[k] = 1
    tok, cfg = _W["tok"], _W["cfg"]
    kill_at = os.environ.get(KILL_AT_ENV) if started is not None else None
    path = _W["inputs"][fi]
    root = path.parent.resolve()
    skips = SkipLog()
    media = _Media(tok, _W["cache"], cfg.max_media_bytes, _W["stats"])
    docs, sources = [], []
    with open(path, "rb") as f:
        f.seek(start)
        for j in range(n):
            where = f"{path.name}:{first + j}"
            if kill_at == where:
                os.kill(os.getpid(), signal.SIGKILL)
            line, too_long = _read_line(f, cfg.max_line_bytes)
            if not too_long and not line.strip():
                continue
            try:
                if too_long:
                    raise _Skip("line_too_long", f"longer than the cap of {cfg.max_line_bytes} bytes (--max-line-mb)")
                items, source, new = _parse(line, path.parent, root, tok, cfg, media)
            except _Skip as e:
                if cfg.strict:
                    raise ShardError(f"{where}: {e} (--strict)") from None
                skips.add(e.reason, f"{where}: {e}")
                continue
            media.add(new)
            docs.append(items)
            sources.append(source or path.stem)
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
        "skips": skips.to_dict(),
        "lines": n,
    }


class _WorkerDied(Exception):
    pass


class _Workers:
    """Chunk results in input order from worker processes. Every wait ends: a worker that dies (SIGKILL from
    the out-of-memory killer, a segfault) breaks the pool, and the wait for its chunk raises `_WorkerDied`
    naming the chunks that were being encoded."""

    def __init__(self, n: int, init_args: tuple, todo: list, inputs: list[Path]):
        ctx = mp.get_context("spawn")
        self.started = ctx.RawArray("b", max(1, len(todo)))  # per chunk: 1 while a worker encodes it, then 2
        self.todo, self.inputs, self.ahead = todo, inputs, 2 * n
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
        for k, (fi, _, n, first) in enumerate(self.todo):
            if self.started[k] == 1:
                names.append(f"{self.inputs[fi].name} lines {first}-{first + n - 1}")
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
def _check_disposable(out: Path, inputs: list[Path]) -> None:
    """`--force` deletes `out`: only a shard set (or an empty directory), and never one holding an input."""
    root = out.resolve()
    for p in inputs:
        if p.resolve().is_relative_to(root):
            raise ShardError(f"--out {out} holds the input {p}; --force would delete it: choose another --out")
    if not out.is_dir():
        raise ShardError(f"--out {out} is not a directory")
    if any(p.name != LOCK_NAME for p in out.iterdir()) and not (out / "manifest.json").is_file():
        raise ShardError(f"--out {out} is not a shard set (no manifest.json) and is not empty; --force only "
                         f"replaces a shard set: choose another --out")


def _clear(out: Path) -> None:
    """Empty `out`, all but the lock this run holds on it."""
    for p in out.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def pretokenize(bundle: str | Path, inputs: list[str | Path], out: str | Path,
                cfg: PretokenizeConfig | None = None, force: bool = False, progress: bool = True) -> dict:
    cfg = cfg or PretokenizeConfig()
    out, bundle = Path(out), Path(bundle)
    spec = read_bundle_spec(bundle)
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input {p} does not exist")
    if force and out.exists():
        _check_disposable(out, paths + [bundle])  # before the lock file is made in a directory of the user's
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(out)  # before anything in `out` is read or replaced
    try:
        if force:
            _check_disposable(out, paths + [bundle])
            _clear(out)
        return _pretokenize(spec, bundle, paths, out, cfg, progress)
    finally:
        lock.release()


def _pretokenize(spec: dict, bundle: Path, paths: list[Path], out: Path, cfg: PretokenizeConfig, progress: bool) -> dict:
    layout = VocabLayout.from_dict(spec["layout"])
    prints = [fingerprint(p) for p in paths]
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
    pool, ok = None, False
    try:
        if workers == 1:
            _init_worker(*init_args)
            results = map(_encode_chunk, enumerate(todo))
        else:
            pool = _Workers(workers, init_args, todo, paths)
            results = pool.results()
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


# ------------------------------------------------------------------------------------------------ CLI
def add_pretokenize_arguments(p) -> None:
    p.add_argument("--tokenizer", required=True, metavar="BUNDLE")
    p.add_argument("--input", nargs="+", required=True, metavar="JSONL")
    p.add_argument("--out", required=True, metavar="SHARDS")
    p.add_argument("--workers", type=int, default=PretokenizeConfig.workers)
    p.add_argument("--docs-per-shard", type=int, default=PretokenizeConfig.docs_per_shard)
    p.add_argument("--max-audio-seconds", type=float, default=PretokenizeConfig.max_audio_seconds,
                   help="longer clips are refused (counted as too_long)")
    p.add_argument("--max-line-mb", type=float, default=PretokenizeConfig.max_line_bytes / 2**20,
                   help="longer JSONL lines are skipped (counted as line_too_long)")
    p.add_argument("--max-media-mb", type=float, default=PretokenizeConfig.max_media_bytes / 2**20,
                   help="decoded media a worker holds before encoding them (bounds each worker's memory)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="read media paths that leave the JSONL file's folder (absolute, ../, symlinks out)")
    p.add_argument("--device", default="auto", help="where codecs run: auto, cpu or cuda")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.add_argument("--force", action="store_true", help="discard an existing shard set in --out and start over")


def run_pretokenize(args) -> int:
    from tessera.errors import TesseraError

    for flag in ("max_line_mb", "max_media_mb"):
        if not getattr(args, flag) > 0:
            raise TesseraError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    cfg = PretokenizeConfig(docs_per_shard=args.docs_per_shard, workers=args.workers, strict=args.strict,
                            max_audio_seconds=args.max_audio_seconds, max_line_bytes=int(args.max_line_mb * 2**20),
                            max_media_bytes=int(args.max_media_mb * 2**20),
                            allow_outside_paths=args.allow_outside_paths, device=args.device)
    m = pretokenize(args.tokenizer, args.input, args.out, cfg, force=args.force)
    t = m["tokens"]
    print(f"{m['docs']} documents, {t['total']} tokens (text {t['text']}, image {t['image']}, audio {t['audio']}) "
          f"in {len(m['shards'])} shard(s) -> {args.out}")
    sk = m["skipped"]
    if sk["total"]:
        print(f"skipped {sk['total']}: " + ", ".join(f"{k}={v}" for k, v in sk["counts"].items())
              + f" (details in {Path(args.out) / 'manifest.json'})")
    return 0
