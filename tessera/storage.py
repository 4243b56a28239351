"""Durable files: atomic writes, content hashes, safe loading.

Every file tessera writes that a later job reads (configs, codecs, bundles, checkpoints, manifests) goes
through these helpers: written under a temporary name in the same directory, flushed, fsynced and renamed,
so a crash leaves either the old file or the new one, never half of one. Tensors are stored as
safetensors and state as JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# JSON files tessera reads are small (configs, manifests, loader state). A bound keeps a hostile or
# corrupted file from exhausting memory.
MAX_JSON_BYTES = 256 * 1024 * 1024


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _relax(path, is_dir: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual umask-based mode."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A hidden temporary directory beside its final place, with the usual permissions."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _relax(tmp, is_dir=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _relax(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_header(path: Path, fmt: str, version: int | tuple[int, ...], noun: str, error: type[Exception]) -> dict:
    """A directory's JSON header file (a bundle's tokenizer.json, a codec's codec.json), checked for its
    format and version (one, or a tuple of those this tessera reads); `error(...)` says what is wrong."""
    if not path.is_file():
        raise error(f"{path.parent} is not a {noun} directory: {path} is missing")
    head = read_json(path)
    if not isinstance(head, dict) or head.get("format") != fmt:
        raise error(f"{path}: format is {head.get('format') if isinstance(head, dict) else None!r}, expected {fmt!r}")
    versions = version if isinstance(version, tuple) else (version,)
    if head.get("version") not in versions:
        raise error(f"{path}: {noun} version {head.get('version')} is not supported (this tessera reads "
                    f"{', '.join(map(str, versions))})")
    return head


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes is larger than the {max_bytes}-byte limit for JSON files")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Save a flat dict of tensors as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # safetensors refuses shared or non-contiguous storage: store plain contiguous copies (tied weights,
        # one tensor under two names, are stored twice).
        clean, seen = {}, set()
        for k, v in tensors.items():
            v = v.detach().contiguous().cpu()
            if v.numel() and v.untyped_storage().data_ptr() in seen:
                v = v.clone()
            seen.add(v.untyped_storage().data_ptr())
            clean[k] = v
        save_file(clean, tmp, metadata=metadata)
        _relax(tmp)  # after writing: safetensors recreates the file with mkstemp's private mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load safetensors (no pickle, no code execution)."""
    return load_file(str(path), device=str(device))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, names: list[str] | None = None) -> str:
    """Content hash of a directory: file names and bytes, in sorted order.

    `names` restricts the hash to those files (relative paths); by default every regular file counts.
    """
    root = Path(path)
    files = sorted(names) if names is not None else sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
    )
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode("utf-8") + b"\0")
        h.update(sha256_file(root / rel).encode("ascii"))
    return h.hexdigest()


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place; an existing one is replaced."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


def check_output_dir(out: str | os.PathLike, inputs, *, noun: str, markers: tuple[str, ...], error=None,
                     force: bool = False, inside_inputs: bool = False, ignore: tuple[str, ...] = (".lock",)) -> None:
    """Where a command writes: never an input's directory, a directory inside one (unless `inside_inputs`),
    or one that holds one; a non-empty directory (not counting `ignore`: the run's own lock) only when it
    already is `noun` ("a training run": it has one of the names in `markers`). With `force` (a command that
    replaces its output) the same holds: `--force` replaces such an output, nothing else. `inputs` may hold
    None for inputs not given. Reads only."""
    from tessera.errors import TesseraError

    error = error or TesseraError
    out = Path(out)
    root = out.resolve()
    for p in inputs:
        if p is None:
            continue
        p = Path(p)
        rp = p.resolve()
        if root == rp or (root.is_relative_to(rp) and not inside_inputs):
            where = "is" if root == rp else "lies inside"
            raise error(f"--out {out} {where} the input {p}: a run's files would mix with its input; "
                        "choose an --out apart from the inputs")
        if rp.is_relative_to(root):
            raise error(f"--out {out} holds the input {p}; choose an --out apart from the inputs")
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file, not a directory")
    mine = any((out / m).exists() for m in markers)
    if out.is_dir() and not mine and any(q.name not in ignore for q in out.iterdir()):
        raise error(f"--out {out} is not empty and is not {noun}"
                    + ("; --force only replaces one" if force else "") + ": choose a new or empty --out")
