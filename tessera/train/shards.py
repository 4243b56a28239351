"""Token shards: the pretokenized corpus, memory-mapped by the loader.

    shards/
      manifest.json                tokenizer hash + layout, inputs, shards, token counts per modality and
                                   source, skipped samples with reasons, `complete`
      shard_00000.tokens           uint32, every document's ids back to back (<s> ... </s>)
      shard_00000.index            uint64, n_docs + 1 offsets into .tokens
      shard_00000.mask             uint8, 1 where the token is a training target (0: "loss": false)
      shard_00000.source           uint16, each document's source (an index into manifest["sources"])
      source_0000.docs             uint64, global ids of the documents of source 0 (written at completion)

Each shard is written under temporary names and renamed, then recorded in the manifest (atomically), so an
interrupted pretokenization resumes at the first unrecorded shard. Temporary names carry the writer's pid
and a random part, so two writers never share one. A run holds `.lock` in the directory (`flock`, released
when the run ends or its process dies), so a second run into the same directory is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tessera.errors import TesseraError
from tessera.runtime.checkpoint import RunLock
from tessera.storage import atomic_write_json, read_json

SHARDS_FORMAT = "tessera-shards"
SHARDS_VERSION = 1
SUFFIXES = {"tokens": np.uint32, "index": np.uint64, "mask": np.uint8, "source": np.uint16}


class ShardError(TesseraError):
    pass


def _temp_name(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_array(path: Path, arr: np.ndarray) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(np.ascontiguousarray(arr).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


LOCK_NAME = RunLock.NAME


def lock_output_dir(directory: str | os.PathLike, what: str = "tessera data pretokenize",
                    wait: float = 0.0) -> RunLock:
    """Hold `directory` for this process, or raise `ShardError` naming the run that holds it (after waiting up
    to `wait` seconds for it to end)."""
    return RunLock(directory, command=what, wait=wait, error=ShardError).acquire()


def write_shard(out: Path, name: str, tokens: np.ndarray, index: np.ndarray, mask: np.ndarray,
                source: np.ndarray) -> None:
    for suffix, arr in (("tokens", tokens), ("index", index), ("mask", mask), ("source", source)):
        _atomic_array(out / f"{name}.{suffix}", arr.astype(SUFFIXES[suffix], copy=False))


def read_manifest(shards_dir: str | Path) -> dict:
    p = Path(shards_dir) / "manifest.json"
    if not p.is_file():
        raise ShardError(f"{shards_dir} holds no shards (manifest.json is missing); run `tessera data pretokenize`")
    m = read_json(p)
    if m.get("format") != SHARDS_FORMAT or m.get("version") != SHARDS_VERSION:
        raise ShardError(f"{p}: not a tessera shard manifest of version {SHARDS_VERSION}")
    return m


def write_manifest(shards_dir: Path, manifest: dict) -> None:
    atomic_write_json(Path(shards_dir) / "manifest.json", manifest)


def data_fingerprint(manifest: dict) -> str:
    """The identity of a shard set: its manifest (tokenizer hash, inputs with their sizes and times, settings,
    shards, sources, counts, skips) without what does not change the data (timing, worker count, device, the
    bundle's path). Moving the shard directory keeps it; other inputs or another pretokenization change it."""
    ident = {k: v for k, v in manifest.items() if k not in ("seconds", "bundle")}
    if isinstance(ident.get("config"), dict):
        ident["config"] = {k: v for k, v in ident["config"].items() if k not in ("workers", "device")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class _Shard:
    tokens: np.ndarray
    index: np.ndarray
    mask: np.ndarray
    source: np.ndarray


class ShardReader:
    """Random access to the documents of a shard directory, through memory maps.

    Memory held is O(number of shards); documents are read from the page cache on demand.
    """

    def __init__(self, shards_dir: str | Path, require_complete: bool = True):
        self.dir = Path(shards_dir)
        self.manifest = read_manifest(self.dir)
        if require_complete and not self.manifest.get("complete"):
            raise ShardError(f"{self.dir}: pretokenization did not finish; run `tessera data pretokenize` again to resume")
        self.sources: list[str] = list(self.manifest["sources"])
        self._shards: list[_Shard] = []
        starts = [0]
        for s in self.manifest["shards"]:
            arrays = {}
            for suffix, dtype in SUFFIXES.items():
                path = self.dir / f"{s['name']}.{suffix}"
                if not path.is_file():
                    raise ShardError(f"{path} is missing")
                arrays[suffix] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
            shard = _Shard(**arrays)
            if len(shard.index) != s["docs"] + 1 or len(shard.tokens) != s["tokens"] or len(shard.mask) != s["tokens"]:
                raise ShardError(f"{self.dir / s['name']}: sizes differ from the manifest (a truncated or foreign shard)")
            self._shards.append(shard)
            starts.append(starts[-1] + s["docs"])
        self._starts = np.asarray(starts, dtype=np.int64)
        self.n_docs = int(self._starts[-1])

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer_hash"]

    def _locate(self, doc: int) -> tuple[_Shard, int]:
        if not 0 <= doc < self.n_docs:
            raise IndexError(f"document {doc} out of range [0, {self.n_docs})")
        s = int(np.searchsorted(self._starts, doc, side="right") - 1)
        return self._shards[s], doc - int(self._starts[s])

    def doc_len(self, doc: int) -> int:
        sh, i = self._locate(doc)
        return int(sh.index[i + 1] - sh.index[i])

    def doc(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) of one document, as read-only views into the memory maps."""
        sh, i = self._locate(doc)
        a, b = int(sh.index[i]), int(sh.index[i + 1])
        return sh.tokens[a:b], sh.mask[a:b]

    def source_docs(self, source: int) -> np.ndarray:
        """Global ids of one source's documents (memory-mapped)."""
        path = self.dir / f"source_{source:04d}.docs"
        return np.memmap(path, dtype=np.uint64, mode="r") if path.stat().st_size else np.zeros(0, np.uint64)


def write_source_index(shards_dir: Path, manifest: dict) -> None:
    """Per-source lists of global document ids, streamed shard by shard (bounded memory)."""
    n_src = len(manifest["sources"])
    tmp_paths = [_temp_name(shards_dir / f"source_{k:04d}.docs") for k in range(n_src)]
    files = []
    try:
        files += [open(p, "xb") for p in tmp_paths]
        start = 0
        for s in manifest["shards"]:
            src = np.fromfile(shards_dir / f"{s['name']}.source", dtype=np.uint16)
            ids = np.arange(start, start + len(src), dtype=np.uint64)
            for k in range(n_src):
                files[k].write(ids[src == k].tobytes())
            start += len(src)
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for k, p in enumerate(tmp_paths):
            os.replace(p, shards_dir / f"source_{k:04d}.docs")
    except BaseException:
        for f in files:
            f.close()
        for p in tmp_paths:
            p.unlink(missing_ok=True)
        raise


def write_token_shards(out: str | Path, docs: list, layout_dict: dict, tokenizer_hash: str, *,
                       masks: list | None = None, sources: list[str] | None = None, docs_per_shard: int = 4096) -> dict:
    """Write already-tokenized documents (lists of ids, each `<s> ... </s>`) as a complete shard directory.

    For synthetic corpora (tests, loader benchmarks) and for tools that tokenize by other means.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(set(sources or ["default"]), key=(sources or ["default"]).index)
    manifest = {
        "format": SHARDS_FORMAT, "version": SHARDS_VERSION, "tokenizer_hash": tokenizer_hash,
        "layout": layout_dict, "inputs": [], "config": {"docs_per_shard": docs_per_shard}, "shards": [],
        "sources": names, "docs": len(docs), "tokens": {"total": int(sum(len(d) for d in docs))},
        "skipped": {"total": 0, "counts": {}, "examples": {}}, "complete": False,
    }
    for k, i in enumerate(range(0, len(docs), docs_per_shard)):
        chunk = docs[i : i + docs_per_shard]
        mchunk = masks[i : i + docs_per_shard] if masks is not None else [np.ones(len(d), np.uint8) for d in chunk]
        schunk = sources[i : i + docs_per_shard] if sources is not None else ["default"] * len(chunk)
        name = f"shard_{k:05d}"
        offsets = np.cumsum([0] + [len(d) for d in chunk]).astype(np.uint64)
        write_shard(out, name, np.concatenate([np.asarray(d) for d in chunk]).astype(np.uint32), offsets,
                    np.concatenate([np.asarray(m) for m in mchunk]).astype(np.uint8),
                    np.asarray([names.index(s) for s in schunk], np.uint16))
        manifest["shards"].append({"name": name, "docs": len(chunk), "tokens": int(offsets[-1])})
    write_source_index(out, manifest)
    manifest["complete"] = True
    write_manifest(out, manifest)
    return manifest
