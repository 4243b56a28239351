"""Readers: every corpus format `tessera data pretokenize` takes, turned into one stream of documents.

A reader turns one input (a file or a folder) into documents: lists of `(kind, value, loss)` segments, text
as `str` and media either as a `Path` on disk (already checked against the path policy) or as a `Blob` of
bytes from inside a container (a tar member, a Parquet or Arrow cell), which the pretokenizer decodes in
memory. What it cannot turn into a document is a `Skip` with a short reason, which the pretokenizer counts.

| format        | input                                   | a document                                          |
|---------------|-----------------------------------------|-----------------------------------------------------|
| `jsonl`       | `docs.jsonl`                            | a line's `segments` (text, image and audio paths)   |
| `webdataset`  | `shard.tar`, `.tar.gz`, `.tgz`          | a sample: `key.jpg/png/webp...` and/or `key.wav/flac...`, with `key.txt` or `key.json` |
| `parquet`     | `part.parquet`                          | a row: an image (or audio) and its caption, or interleaved `texts` / `images` lists |
| `hf`          | a `save_to_disk` folder, or an `.arrow` | a row, as for Parquet                               |
| `imagefolder` | a folder of images                      | an image and its sidecar `NAME.txt` caption         |
| `librispeech` | a folder with `*.trans.txt`             | an utterance's audio and its transcript             |
| `commonvoice` | `train.tsv` (`path`, `sentence`)        | a clip (in `clips/` beside the TSV) and its sentence |

Each reader plans its input as chunks of at most N records, deterministically from the input as it is on
disk; a chunk is a small picklable spec, and `records(spec)` reads exactly that chunk's records. So a run
resumes at the first chunk it has not written, and rank r of W processes takes chunks r, r + W, ...

Bad samples are `Skip`s, never exceptions: a tar member that cannot be read (`corrupt_tar`), a JSON caption
that does not parse (`bad_json`), text that is not UTF-8 (`bad_text`), an image or clip without its
caption or transcript (`missing_caption`, `missing_transcript`), a row whose `texts` and `images` differ in
length (`mismatched_lengths`), a Parquet row group that cannot be decoded (`corrupt_parquet`, one per row
lost), a media URL (`not_local`: nothing is downloaded). An input that cannot be read at all (a corrupt
Parquet footer, a tar that is not a tar) is one skip for what it held. Only what a user must fix (a column
that is not there, an input whose format cannot be told) is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tessera.errors import TesseraError
from tessera.tokenizers.chat import ChatError, ChatTemplate, split_message
from tessera.unimodal.media import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS

FORMATS = ("jsonl", "webdataset", "parquet", "hf", "imagefolder", "librispeech", "commonvoice")
ROLES = ("image", "audio", "text", "texts", "images", "field")

# column names tried, in order, when --column does not name one (Parquet and Arrow tables)
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes")
AUDIO_COLUMNS = ("audio", "flac", "wav", "mp3")
TEXT_COLUMNS = ("text", "caption", "txt", "sentence", "transcript", "transcription")
# tar members: extensions of each role (the last suffix of the member's name); caption files in order of
# preference; the fields of a JSON caption that are tried, in order
TAR_IMAGE = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"}
TAR_AUDIO = {"wav", "flac", "mp3", "ogg", "oga", "opus"}
TAR_TEXT = ("txt", "text", "caption", "json")
TEXT_FIELDS = ("caption", "text", "txt", "sentence", "transcript", "transcription")

_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


class Skip(Exception):
    """A record that is not a usable document: `reason` is the short key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Blob:
    """Media bytes from inside a container, decoded in memory; `name` says where they came from."""

    data: bytes
    name: str

    def __repr__(self) -> str:
        return f"Blob({self.name!r}, {len(self.data)} bytes)"


@dataclass
class Document:
    segments: list  # [(kind, value, loss)]: kind "text" (str), "image" or "audio" (Path or Blob)
    source: str | None = None  # None: the reader's default source


@dataclass
class ReaderOptions:
    format: str = "auto"
    columns: dict = field(default_factory=dict)  # role -> column (tables), extension (tar) or JSON field
    text_first: bool = False  # caption/transcript before the media (default: media, then text)
    split: str | None = None  # the split of a saved DatasetDict
    source: str | None = None  # every document's source (default: per reader)
    allow_outside_paths: bool = False
    max_line_bytes: int = 16 * 2**20  # a longer JSONL line (or TSV row, caption file) is skipped
    max_member_bytes: int = 2**30  # a larger tar member or sidecar file is skipped
    chat: dict | None = None  # the bundle's chat template, for `messages` documents (None: the default)


def show(value: str, n: int = 120) -> str:
    return value if len(value) <= n else value[:n] + "..."


def file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def tree_fingerprint(path: Path) -> dict:
    """A folder's files, summarized: their number, total size, and a digest of every name, size and mtime."""
    n = size = 0
    h = hashlib.sha1()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            n, size = n + 1, size + st.st_size
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(path.resolve()), "files": n, "bytes": size, "digest": h.hexdigest()}


def local_media(base: Path, root: Path, value: str, allow_outside: bool) -> Path:
    """A media path relative to `base`, refused (`outside_root`) when it leaves `root` (symlinks resolved)."""
    path = base / value
    if not allow_outside:
        try:
            inside = path.resolve().is_relative_to(root)
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a symlink loop
            raise Skip("bad_segment", f"{show(value)!r} is not a usable path ({e})") from None
        if not inside:
            raise Skip("outside_root", f"{show(value)}: path outside the data root {root} "
                                       f"(--allow-outside-paths reads it)")
    return path


def read_line(f, limit: int) -> tuple[bytes, bool]:
    """The next line, or (b"", True) after skipping past a line longer than `limit` bytes."""
    line = f.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, False
    while line and not line.endswith(b"\n"):
        line = f.readline(2**20)
    return b"", True


def plan_lines(path: Path, per_chunk: int, start: int = 0, first: int = 1,
               block: int = 2**20) -> list[tuple[int, int, int]]:
    """(byte offset, number of lines, first line number) of every chunk of `per_chunk` lines of a file,
    from byte `start` (line `first`). Read in blocks: a line of any length costs no more than a block."""
    chunks = []
    n, offset, line_end = 0, start, start
    with open(path, "rb") as f:
        f.seek(start)
        while data := f.read(block):
            j = data.find(b"\n")
            while j >= 0:
                n += 1
                line_end = offset + j + 1
                if n == per_chunk:
                    chunks.append((start, n, first))
                    start, first, n = line_end, first + n, 0
                j = data.find(b"\n", j + 1)
            offset += len(data)
    if offset > line_end:  # a last line without a newline
        n += 1
    if n:
        chunks.append((start, n, first))
    return chunks


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("bad_text", f"{name}: not UTF-8 text ({e})") from None


def _caption_missing(kinds: list[str]) -> Skip:
    if kinds and all(k == "audio" for k in kinds):
        return Skip("missing_transcript", "audio without a transcript")
    return Skip("missing_caption", "an image without a caption")


# ------------------------------------------------------------------------------------------- the readers
class Reader:
    """One input. Subclasses define `plan`, `size`, `describe` and `records`."""

    format = ""

    def __init__(self, path: str | os.PathLike, opts: ReaderOptions):
        self.path, self.opts = Path(path), opts
        self.name = self.path.name

    @property
    def default_source(self) -> str:
        return self.opts.source or self._default_source()

    def _default_source(self) -> str:
        return self.path.stem

    def fingerprint(self) -> dict:
        return {"format": self.format, **file_fingerprint(self.path)}

    def plan(self, per_chunk: int) -> list:
        raise NotImplementedError

    def size(self, spec) -> int:
        """The records a chunk holds (documents and skips)."""
        raise NotImplementedError

    def describe(self, spec) -> str:
        raise NotImplementedError

    def records(self, spec) -> Iterator[tuple[str, Document | Skip | None]]:
        """(where, a document, a skip, or None for a blank line) for each record of a chunk, in order."""
        raise NotImplementedError

    def _doc(self, media: list, text: str) -> Document:
        text_seg = [("text", text, True)]
        media_segs = [(k, v, True) for k, v in media]
        return Document(text_seg + media_segs if self.opts.text_first else media_segs + text_seg)


class JsonlReader(Reader):
    """`{"segments": [{"text": ...}, {"image": "rel/path.png"}, {"audio": "rel/path.wav", "loss": false}],
    "source": ...}`, one per line, media paths relative to the file's folder."""

    format = "jsonl"

    def fingerprint(self) -> dict:  # as shard sets made before there were other formats record it
        return file_fingerprint(self.path)

    def plan(self, per_chunk: int) -> list:
        return plan_lines(self.path, per_chunk)

    def size(self, spec) -> int:
        return spec[1]

    def describe(self, spec) -> str:
        _, n, first = spec
        return f"{self.name} lines {first}-{first + n - 1}"

    def records(self, spec):
        start, n, first = spec
        base = self.path.parent
        root = base.resolve()
        with open(self.path, "rb") as f:
            f.seek(start)
            for j in range(n):
                where = f"{self.name}:{first + j}"
                line, too_long = read_line(f, self.opts.max_line_bytes)
                if too_long:
                    yield where, Skip("line_too_long", f"longer than the cap of {self.opts.max_line_bytes} bytes "
                                                       f"(--max-line-mb)")
                elif not line.strip():
                    yield where, None
                else:
                    try:
                        yield where, self.parse(line, base, root)
                    except Skip as e:
                        yield where, e

    def parse(self, line: bytes, base: Path, root: Path) -> Document:
        try:
            return self._parse(line, base, root)
        except RecursionError:  # from the parser, or from printing a deeply nested segment in a message
            raise Skip("bad_json", "nested too deep for the JSON parser") from None

    def _parse(self, line: bytes, base: Path, root: Path) -> Document:
        try:
            doc = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
            raise Skip("bad_json", f"not valid JSON: {str(e).split(';')[0]}") from None
        if isinstance(doc, dict) and "messages" in doc:
            return self._conversation(doc, base, root)
        if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
            raise Skip("no_segments", "a document needs a 'segments' list (or a 'messages' list)")
        segments = self._segments(doc["segments"], base, root)
        if not segments:
            raise Skip("empty", "the document has no content")
        return Document(segments, _source(doc))

    def _conversation(self, doc: dict, base: Path, root: Path) -> Document:
        """A `messages` document, rendered by the bundle's chat template (tessera.tokenizers.chat)."""
        messages = doc["messages"]
        if not isinstance(messages, list) or not messages:
            raise Skip("bad_message", "'messages' must be a non-empty list")
        turns = []
        try:
            for n, msg in enumerate(messages):
                role, content = split_message(msg, n)
                if isinstance(content, str):
                    content = [{"text": content}]
                if not isinstance(content, list):
                    raise ChatError(f"message {n}: content must be a string or a list of segments")
                turns.append((role, self._segments(content, base, root)))
            segments = ChatTemplate.from_dict(self.opts.chat).render(turns)
        except ChatError as e:
            raise Skip("bad_message", str(e)) from None
        if not any(loss for _, _, loss in segments):
            raise Skip("bad_message", "the conversation has no assistant content to learn from")
        return Document(segments, _source(doc))

    def _segments(self, segs: list, base: Path, root: Path) -> list:
        segments = []
        for seg in segs:
            kinds = [k for k in ("text", "image", "audio") if isinstance(seg, dict) and k in seg]
            if len(kinds) != 1:
                raise Skip("bad_segment", f"a segment needs exactly one of text/image/audio: {show(repr(seg), 80)}")
            kind = kinds[0]
            loss = seg.get("loss", True)
            if not isinstance(loss, bool):
                raise Skip("bad_segment", "'loss' must be true or false")
            value = seg[kind]
            if kind == "text":
                if not isinstance(value, str):
                    raise Skip("bad_segment", "a text segment must be a string")
                if value:
                    segments.append(("text", value, loss))
                continue
            if not isinstance(value, str):
                raise Skip("bad_segment", f"an {kind} segment must be a path")
            segments.append((kind, local_media(base, root, value, self.opts.allow_outside_paths), loss))
        return segments


def _source(doc: dict) -> str | None:
    source = doc.get("source")
    if source is not None and not isinstance(source, str):
        raise Skip("bad_segment", "'source' must be a string")
    return source


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: the key ends at the name's first dot


class WebDatasetReader(Reader):
    """A WebDataset shard: a tar whose consecutive members that share a key (`dir/name` up to the first dot
    of the file name) form one sample. Images and audio become the media, in member order; the caption is
    `key.txt` (or `.text`, `.caption`, or a string field of `key.json`: `caption`, `text`, ...).

    `--column image=EXT`, `audio=EXT` and `text=EXT` choose the members of each role; `--column field=NAME`
    the JSON caption's field. Chunks start at the tar header of their first sample, so a worker seeks there
    (in a `.tar.gz`, it decompresses up to there). Python's `tarfile`, not the `webdataset` package: it can
    start at a byte offset, and it lets every unreadable member be counted where it is."""

    format = "webdataset"

    def _default_source(self) -> str:
        return self.path.parent.name or self.path.stem

    def _open(self):
        if self.name.endswith((".gz", ".tgz")):
            return gzip.open(self.path, "rb")
        return open(self.path, "rb")

    def _role(self, ext: str) -> str | None:
        last = ext.rsplit(".", 1)[-1].lower()
        cols = self.opts.columns
        for role, exts in (("image", TAR_IMAGE), ("audio", TAR_AUDIO), ("text", set(TAR_TEXT))):
            if (last == cols[role].lower() if role in cols else last in exts):
                return role
        return None

    def plan(self, per_chunk: int) -> list:
        chunks: list[list] = []  # [offset of the first header, samples, index of the first sample, error]
        key, n, error = None, 0, None
        try:
            with self._open() as raw:
                try:
                    tf = tarfile.open(fileobj=raw, mode="r:")
                except _READ_ERRORS as e:
                    return [(0, 0, 0, ("corrupt_tar", f"{self.name}: not a readable tar file ({e})"))]
                while True:
                    try:
                        m = tf.next()
                    except _READ_ERRORS as e:
                        error = ("corrupt_tar", f"{self.name}: unreadable past byte {tf.offset} ({e}); the rest "
                                                f"of the file is lost")
                        break
                    if m is None:
                        break
                    tf.members.clear()  # the plan keeps chunk starts only, not every member
                    kx = _KEY.match(m.name) if m.isfile() else None
                    if kx is None:
                        continue
                    if kx.group(1) != key:
                        key = kx.group(1)
                        if n % per_chunk == 0:
                            chunks.append([m.offset, 0, n, None])
                        chunks[-1][1] += 1
                        n += 1
                if error is None:
                    error = self._damaged_tail(raw, tf.offset)
        except _READ_ERRORS as e:
            error = ("corrupt_tar", f"{self.name}: unreadable ({e})")
        if error is not None:  # counted once, with the file's last chunk
            if not chunks:
                chunks.append([0, 0, 0, None])
            chunks[-1][3] = error
        return [tuple(c) for c in chunks]

    def _damaged_tail(self, raw, offset: int):
        """`tarfile` stops without a word at a damaged header past the first: what follows the last header
        it read must be the end-of-archive zeros."""
        try:
            raw.seek(offset)
            while block := raw.read(1 << 16):
                if block.strip(b"\0"):
                    return ("corrupt_tar", f"{self.name}: a damaged tar header at byte {offset}; the samples "
                                           f"after it cannot be read")
        except _READ_ERRORS as e:
            return ("corrupt_tar", f"{self.name}: unreadable past byte {offset} ({e})")
        return None

    def size(self, spec) -> int:
        return spec[1] + (spec[3] is not None)

    def describe(self, spec) -> str:
        _, n, first, _ = spec
        return f"{self.name} samples {first + 1}-{first + n}"

    def _members(self, tf) -> Iterator[tuple[str, str, str, object]]:
        """(key, extension, name, bytes or Skip) of each member of a known role, read as it comes (a
        `.tar.gz` cannot seek back)."""
        while True:
            try:
                m = tf.next()
            except _READ_ERRORS as e:
                yield "", "", "", Skip("corrupt_tar", f"{self.name}: unreadable past byte {tf.offset} ({e})")
                return
            if m is None:
                return
            tf.members.clear()
            kx = _KEY.match(m.name) if m.isfile() else None
            if kx is None:
                continue
            key, ext = kx.group(1), kx.group(2)
            if self._role(ext) is None:
                yield key, ext, m.name, None  # a member of the sample that no role reads (.cls, .meta, ...)
                continue
            if m.size > self.opts.max_member_bytes:
                data = Skip("too_large", f"{m.name}: {m.size} bytes, over the cap of {self.opts.max_member_bytes}")
            else:
                try:
                    data = tf.extractfile(m).read()
                except _READ_ERRORS as e:
                    data = Skip("corrupt_tar", f"{m.name}: cannot read the member ({type(e).__name__}: {e})")
            yield key, ext, m.name, data

    def records(self, spec):
        offset, n, first, error = spec
        if n:
            yield from self._samples(offset, n, first)
        if error is not None:
            yield f"{self.name}", Skip(*error)

    def _samples(self, offset: int, n: int, first: int):
        with self._open() as raw:
            try:
                raw.seek(offset)
                tf = tarfile.open(fileobj=raw, mode="r:")
            except _READ_ERRORS as e:
                for i in range(n):
                    yield f"{self.name}#{first + i}", Skip("corrupt_tar", f"{self.name}: unreadable at byte "
                                                                          f"{offset} ({e})")
                return
            key, members, done = None, [], 0
            for k, ext, name, data in self._members(tf):
                if not name:  # the tar breaks off here: the plan counted it, with the file's last chunk
                    break
                if k != key:
                    if members:
                        yield f"{self.name}:{key}", self._sample(members)
                        done += 1
                        if done == n:
                            return
                    key, members = k, []
                members.append((ext, name, data))
            if members and done < n:
                yield f"{self.name}:{key}", self._sample(members)
                done += 1
            for i in range(done, n):  # samples the plan saw that cannot be read now
                yield f"{self.name}#{first + i}", Skip("corrupt_tar", f"{self.name}: sample {first + i + 1} could "
                                                                      f"not be read")

    def _sample(self, members: list) -> Document | Skip:
        media, texts = [], {}
        for ext, name, data in members:
            if isinstance(data, Skip):
                return data
            role = self._role(ext)
            if role in ("image", "audio"):
                media.append((role, Blob(data, f"{self.name}:{name}")))
            elif role == "text":
                texts.setdefault(ext.rsplit(".", 1)[-1].lower(), (name, data))
        try:
            text = self._caption(texts)
        except Skip as e:
            return e
        if not text:
            if not media:
                return Skip("empty", "the sample has no image, audio or text")
            return _caption_missing([k for k, _ in media])
        if not media:
            return Document([("text", text, True)])
        return self._doc(media, text)

    def _caption(self, texts: dict) -> str:
        for ext in sorted(texts, key=lambda e: TAR_TEXT.index(e) if e in TAR_TEXT else -1):
            name, data = texts[ext]
            if ext != "json":
                return _text(data, name).strip()
            try:
                obj = json.loads(data)
            except (ValueError, RecursionError) as e:
                raise Skip("bad_json", f"{name}: not valid JSON ({str(e).split(';')[0]})") from None
            fields = (self.opts.columns["field"],) if "field" in self.opts.columns else TEXT_FIELDS
            for f in fields:
                if isinstance(obj, dict) and isinstance(obj.get(f), str):
                    return obj[f].strip()
            return ""
        return ""


class _TableReader(Reader):
    """Rows of a table (Parquet, or Arrow IPC files of a saved Hugging Face dataset) as documents.

    Pairs: an image column (bytes, `{"bytes", "path"}` as Hugging Face stores images, or a path relative
    to the file's folder) and/or an audio column, with a text column: a document is the media, then the
    text. Interleaved (OBELICS): list columns `texts` and `images` of equal length, exactly one of the two
    non-null at each position. A text column alone gives text documents. `--column ROLE=NAME` names the
    columns (roles image, audio, text, texts, images)."""

    features: dict = {}

    def _files(self) -> list[Path]:
        raise NotImplementedError

    def _schema(self, fi: int):
        raise NotImplementedError

    def _rows(self, fi: int) -> int:
        raise NotImplementedError

    def _batches(self, fi: int, start: int, n: int, columns: list[str]) -> Iterator[tuple[int, list]]:
        """(first row, rows as dicts) of the rows [start, start + n) of file `fi`."""
        raise NotImplementedError

    def _default_source(self) -> str:
        return self.path.parent.name or self.path.stem

    def _typed(self, kind: str) -> list[str]:
        """Columns that the dataset's features declare as Image or Audio (Hugging Face datasets)."""
        want = {"image": "Image", "audio": "Audio"}[kind]
        return [c for c, f in self.features.items() if isinstance(f, dict) and f.get("_type") == want]

    def roles(self, names: list[str]) -> dict:
        cols = self.opts.columns

        def pick(role: str, candidates) -> str | None:
            if role in cols:
                if cols[role] not in names:
                    raise TesseraError(f"{self.name}: there is no column {cols[role]!r} (--column {role}=...); its "
                                       f"columns are {', '.join(names)}")
                return cols[role]
            return next((c for c in candidates if c in names), None)

        texts, images = pick("texts", ("texts",)), pick("images", ("images",))
        if texts and images:
            return {"texts": texts, "images": images}
        if "texts" in cols or "images" in cols:
            raise TesseraError(f"{self.name}: interleaved rows need both --column texts=NAME and --column "
                               f"images=NAME; its columns are {', '.join(names)}")
        found = {"image": pick("image", (*self._typed("image"), *IMAGE_COLUMNS)),
                 "audio": pick("audio", (*self._typed("audio"), *AUDIO_COLUMNS)),
                 "text": pick("text", TEXT_COLUMNS)}
        found = {k: v for k, v in found.items() if v is not None}
        if "text" not in found:
            raise TesseraError(f"{self.name}: no text column among {', '.join(names)}: name it with --column "
                               f"text=NAME (or --column texts=NAME --column images=NAME for interleaved rows)")
        return found

    def plan(self, per_chunk: int) -> list:
        chunks = []
        for fi in range(len(self._files())):
            try:
                names, rows = self._schema(fi), self._rows(fi)
            except Exception as e:  # noqa: BLE001 - a file that cannot be read is one counted skip
                chunks.append((fi, 0, 0, ("corrupt_parquet" if self.format == "parquet" else "corrupt_arrow",
                                          f"{self._label(fi)}: cannot be read ({type(e).__name__}: {e})")))
                continue
            self.roles(names)  # a column that is not there is the user's to fix, before anything is written
            chunks += [(fi, s, min(per_chunk, rows - s), None) for s in range(0, rows, per_chunk)]
        return chunks

    def size(self, spec) -> int:
        return spec[2] + (spec[3] is not None)

    def _label(self, fi: int) -> str:
        return self._files()[fi].name

    def describe(self, spec) -> str:
        fi, s, n, _ = spec
        return f"{self._label(fi)} rows {s}-{s + n - 1}"

    def records(self, spec):
        fi, start, n, error = spec
        name = self._label(fi)
        if error is not None:
            yield name, Skip(*error)
        if not n:
            return
        roles = self.roles(self._schema(fi))
        base = self._files()[fi].parent
        root = self.path.resolve() if self.path.is_dir() else base.resolve()
        done = 0
        try:
            for row0, rows in self._batches(fi, start, n, sorted(set(roles.values()))):
                for j, row in enumerate(rows):
                    where = f"{name}:row {row0 + j}"
                    try:
                        yield where, self._row(row, roles, where, base, root)
                    except Skip as e:
                        yield where, e
                    done += 1
        except Exception as e:  # noqa: BLE001 - rows that cannot be decoded are counted, one skip each
            reason = "corrupt_parquet" if self.format == "parquet" else "corrupt_arrow"
            for r in range(start + done, start + n):
                yield f"{name}:row {r}", Skip(reason, f"{name}: rows {start + done}-{start + n - 1} cannot be "
                                                      f"decoded ({type(e).__name__}: {show(str(e))})")

    def _media(self, kind: str, v, label: str, base: Path, root: Path):
        if isinstance(v, dict):  # Hugging Face's Image and Audio: {"bytes": ..., "path": ...}
            v = v.get("bytes") or v.get("path")
        if isinstance(v, (bytes, bytearray, memoryview)) and len(v):
            return Blob(bytes(v), label)
        if isinstance(v, str) and v:
            if "://" in v:
                raise Skip("not_local", f"{show(v)}: a URL; pretokenize reads only local files and cells")
            return local_media(base, root, v, self.opts.allow_outside_paths)
        if v is None or isinstance(v, (bytes, str)):
            raise Skip(f"missing_{kind}", f"the row has no {kind}")
        raise Skip("bad_segment", f"an {kind} cell must hold bytes or a path, not {type(v).__name__}")

    def _row(self, row: dict, roles: dict, where: str, base: Path, root: Path) -> Document:
        if "texts" in roles:
            texts, images = row[roles["texts"]], row[roles["images"]]
            texts, images = texts if texts is not None else [], images if images is not None else []
            if len(texts) != len(images):
                raise Skip("mismatched_lengths", f"{len(texts)} texts and {len(images)} images")
            segments = []
            for i, (t, im) in enumerate(zip(texts, images)):
                if (t is None) == (im is None):
                    raise Skip("bad_segment", f"position {i} holds {'both' if t is not None else 'neither'} a text "
                                              f"and an image")
                if t is not None:
                    if not isinstance(t, str):
                        raise Skip("bad_segment", f"position {i}: a text must be a string")
                    if t:
                        segments.append(("text", t, True))
                else:
                    segments.append(("image", self._media("image", im, f"{where}[{i}]", base, root), True))
            if not segments:
                raise Skip("empty", "the row has no content")
            return Document(segments)
        media = [(k, self._media(k, row[roles[k]], where, base, root)) for k in ("image", "audio") if k in roles]
        text = row[roles["text"]]
        if text is not None and not isinstance(text, str):
            raise Skip("bad_segment", f"the text column {roles['text']!r} holds {type(text).__name__}, not a string")
        text = (text or "").strip()
        if not text:
            if not media:
                raise Skip("empty", "the row has no content")
            raise _caption_missing([k for k, _ in media])
        if not media:
            return Document([("text", text, True)])
        return self._doc(media, text)


class ParquetReader(_TableReader):
    format = "parquet"

    def _files(self) -> list[Path]:
        return [self.path]

    def _file(self):
        if getattr(self, "_pf", None) is None:
            import pyarrow.parquet as pq

            self._pf = pq.ParquetFile(self.path)
        return self._pf

    def _schema(self, fi: int) -> list[str]:
        return list(self._file().schema_arrow.names)

    def _rows(self, fi: int) -> int:
        return self._file().metadata.num_rows

    def _batches(self, fi, start, n, columns):
        """Rows [start, start + n) in batches. A row group is decoded from its start, so a chunk that begins
        inside one continues the decoding where this reader's previous chunk of that group stopped (the
        cursor), rather than decoding the group again up to `start`: a file of one large row group costs one
        pass per worker, not one per chunk."""
        pf = self._file()
        md = pf.metadata
        row, groups, first = 0, [], None
        for g in range(md.num_row_groups):
            rows = md.row_group(g).num_rows
            if row + rows > start and row < start + n:
                groups.append(g)
                first = row if first is None else first
            row += rows
        key = (tuple(groups), tuple(columns))
        cur, self._cursor = getattr(self, "_cursor", None), None
        if cur is not None and cur["key"] == key and cur["at"] <= start:
            it, batch, at = cur["it"], cur["batch"], cur["at"]
        else:
            it, batch, at = pf.iter_batches(batch_size=256, row_groups=groups, columns=columns), None, first
        end = start + n
        while at < end:
            if batch is None:
                batch = next(it, None)
                if batch is None:
                    return
            lo, hi = max(start, at), min(end, at + batch.num_rows)
            if lo < hi:
                yield lo, batch.slice(lo - at, hi - lo).to_pylist()
            if at + batch.num_rows > end:  # rows past this chunk: the next chunk starts in this batch
                break
            at, batch = at + batch.num_rows, None
        self._cursor = {"key": key, "it": it, "batch": batch, "at": at}


class HFDiskReader(_TableReader):
    """A Hugging Face dataset saved with `save_to_disk`: `state.json` lists its Arrow files (IPC stream
    format), `dataset_info.json` its features (which columns are Image or Audio). A `DatasetDict` folder
    (`dataset_dict.json`) is read at `--split` (default: `train`). An `.arrow` file alone is read as one
    such file without features. Read with pyarrow, memory-mapped: the `datasets` package (and its
    dependencies: pandas, multiprocess, dill, xxhash, aiohttp) is not needed for its on-disk format."""

    format = "hf"

    def __init__(self, path, opts: ReaderOptions):
        super().__init__(path, opts)
        self.split = None
        d = self.path
        if d.is_dir() and (d / "dataset_dict.json").is_file():
            try:
                splits = json.loads((d / "dataset_dict.json").read_text())["splits"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise TesseraError(f"{d / 'dataset_dict.json'}: not a saved DatasetDict ({e})") from None
            split = opts.split or ("train" if "train" in splits else None)
            if split not in splits:
                raise TesseraError(f"{d} is a DatasetDict with splits {', '.join(splits)}: choose one with --split")
            self.split, d = split, d / split
        self.dir = d if d.is_dir() else None
        if self.dir is not None:
            try:
                state = json.loads((d / "state.json").read_text())
                self._paths = [d / f["filename"] for f in state["_data_files"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise TesseraError(f"{d}: not a dataset saved with save_to_disk (state.json: {e})") from None
            try:
                info = json.loads((d / "dataset_info.json").read_text())
                self.features = info.get("features") or {}
            except (OSError, ValueError):
                self.features = {}
        else:
            self._paths = [self.path]
        self._counts: dict[int, int] = {}

    def _default_source(self) -> str:
        if self.path.is_dir():
            return self.path.name + (f"/{self.split}" if self.split else "")
        return super()._default_source()

    def fingerprint(self) -> dict:
        return {"format": self.format, "path": str(self.path.resolve()), "split": self.split,
                "files": [file_fingerprint(p) for p in self._paths]}

    def _files(self) -> list[Path]:
        return self._paths

    def _label(self, fi: int) -> str:
        return self._paths[fi].relative_to(self.path.parent).as_posix()

    def _open(self, fi: int):
        """(schema, record batches) of an Arrow IPC file: the stream format `datasets` writes, or the file
        (random access) format."""
        import pyarrow as pa

        source = pa.memory_map(str(self._paths[fi]))
        try:
            stream = pa.ipc.open_stream(source)
            return stream.schema, stream
        except pa.ArrowInvalid:
            f = pa.ipc.open_file(source)
            return f.schema, (f.get_batch(i) for i in range(f.num_record_batches))

    def _schema(self, fi: int) -> list[str]:
        return list(self._open(fi)[0].names)

    def _rows(self, fi: int) -> int:
        if fi not in self._counts:  # memory-mapped: counting reads batch headers, not the data
            self._counts[fi] = sum(b.num_rows for b in self._open(fi)[1])
        return self._counts[fi]

    def _batches(self, fi, start, n, columns):
        at = 0
        for batch in self._open(fi)[1]:
            lo, hi = max(start, at), min(start + n, at + batch.num_rows)
            if lo < hi:
                part = batch.slice(lo - at, hi - lo).select(columns)
                for s in range(0, part.num_rows, 256):
                    yield lo + s, part.slice(s, 256).to_pylist()
            at += batch.num_rows
            if at >= start + n:
                return


class _FolderReader(Reader):
    """A folder whose records are a sorted listing (`_items`); a chunk is (first index, its items)."""

    unit = ""  # what one record is, for describe()

    def _default_source(self) -> str:
        return self.path.name

    def fingerprint(self) -> dict:
        return {"format": self.format, **tree_fingerprint(self.path)}

    def _items(self) -> list:
        raise NotImplementedError

    def plan(self, per_chunk: int) -> list:
        items = self._items()
        return [(s, tuple(items[s:s + per_chunk])) for s in range(0, len(items), per_chunk)]

    def size(self, spec) -> int:
        return len(spec[1])

    def describe(self, spec) -> str:
        return f"{self.name} {self.unit} {spec[0] + 1}-{spec[0] + len(spec[1])}"


class ImageFolderReader(_FolderReader):
    """A folder (searched recursively, in sorted order) of images, each with its caption in a sidecar
    `NAME.txt` beside it: a document is the image, then the caption."""

    format = "imagefolder"
    unit = "images"

    def _items(self) -> list[str]:
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                      if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    def records(self, spec):
        root = self.path.resolve()
        for rel in spec[1]:
            where = f"{self.name}/{rel}"
            try:
                image = local_media(self.path, root, rel, self.opts.allow_outside_paths)
                cap_rel = rel[: -len(Path(rel).suffix)] + ".txt"
                cap = local_media(self.path, root, cap_rel, self.opts.allow_outside_paths)
                if not cap.is_file():
                    raise Skip("missing_caption", f"{cap_rel}: no such caption file")
                if cap.stat().st_size > self.opts.max_line_bytes:
                    raise Skip("line_too_long", f"{cap_rel}: longer than the cap of {self.opts.max_line_bytes} bytes")
                text = _text(cap.read_bytes(), cap_rel).strip()
                if not text:
                    raise Skip("missing_caption", f"{cap_rel}: the caption is empty")
                yield where, self._doc([("image", image)], text)
            except Skip as e:
                yield where, e
            except OSError as e:
                yield where, Skip("missing_caption", f"{rel}: cannot read its caption ({e})")


class LibriSpeechReader(_FolderReader):
    """LibriSpeech's layout: `SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`, one `UTTERANCE-ID TRANSCRIPT` per
    line, beside `UTTERANCE-ID.flac` (any audio extension). A document is the audio, then its transcript
    (verbatim: LibriSpeech's is upper case). An audio file that no transcript line names is
    `missing_transcript`; a line whose audio file is missing is `missing`."""

    format = "librispeech"
    unit = "utterances"

    def _items(self) -> list[tuple]:
        """(audio path relative to the folder, transcript or None, where, problem or None), sorted."""
        items = []
        for t in sorted(self.path.rglob("*.trans.txt")):
            d = t.parent
            rel = d.relative_to(self.path).as_posix()
            prefix = "" if rel == "." else rel + "/"
            audio = {p.stem: p.name for p in sorted(d.iterdir()) if p.suffix.lower() in AUDIO_EXTENSIONS}
            named = set()
            for lineno, raw in enumerate(t.read_bytes().splitlines(), 1):
                where = f"{prefix}{t.name}:{lineno}"
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    items.append((None, None, where, ("bad_text", f"not UTF-8 text ({e})")))
                    continue
                if not line:
                    continue
                uid, _, text = line.partition(" ")
                named.add(uid)
                items.append((prefix + audio.get(uid, uid + ".flac"), text.strip() or None, where, None))
            items += [(prefix + name, None, prefix + name, None) for stem, name in audio.items() if stem not in named]
        return items

    def records(self, spec):
        root = self.path.resolve()
        for rel, text, where, problem in spec[1]:
            where = f"{self.name}/{where}"
            try:
                if problem is not None:
                    raise Skip(*problem)
                if text is None:
                    raise Skip("missing_transcript", f"{rel}: no line of its .trans.txt names it")
                audio = local_media(self.path, root, rel, self.opts.allow_outside_paths)
                yield where, self._doc([("audio", audio)], text)
            except Skip as e:
                yield where, e


class CommonVoiceReader(Reader):
    """A Common Voice TSV (`train.tsv`, `validated.tsv`, ...): a header naming its columns, then one clip
    per line; `path` names the clip in `clips/` beside the TSV (or beside the TSV itself when there is no
    `clips/`), `sentence` its transcript (`--column audio=...`, `--column text=...` for other names)."""

    format = "commonvoice"

    def _header(self) -> tuple[list[str], int]:
        with open(self.path, "rb") as f:
            line, too_long = read_line(f, self.opts.max_line_bytes)
        try:
            names = line.decode("utf-8").rstrip("\r\n").split("\t")
        except UnicodeDecodeError:
            names = []
        return names, len(line)

    def _columns(self) -> tuple[int, int, int]:
        names, length = self._header()
        want = [self.opts.columns.get("audio", "path"), self.opts.columns.get("text", "sentence")]
        missing = [c for c in want if c not in names]
        if missing:
            raise TesseraError(f"{self.path}: its header has no column {', '.join(map(repr, missing))} (columns: "
                               f"{', '.join(names) or 'none'}); name them with --column audio=NAME --column text=NAME")
        return names.index(want[0]), names.index(want[1]), length

    def plan(self, per_chunk: int) -> list:
        _, _, length = self._columns()
        return plan_lines(self.path, per_chunk, start=length, first=2)

    def size(self, spec) -> int:
        return spec[1]

    def describe(self, spec) -> str:
        _, n, first = spec
        return f"{self.name} lines {first}-{first + n - 1}"

    def records(self, spec):
        start, n, first = spec
        ai, ti, _ = self._columns()
        base = self.path.parent / "clips" if (self.path.parent / "clips").is_dir() else self.path.parent
        root = self.path.parent.resolve()
        with open(self.path, "rb") as f:
            f.seek(start)
            for j in range(n):
                where = f"{self.name}:{first + j}"
                line, too_long = read_line(f, self.opts.max_line_bytes)
                if not too_long and not line.strip():
                    yield where, None
                    continue
                try:
                    if too_long:
                        raise Skip("line_too_long", f"longer than the cap of {self.opts.max_line_bytes} bytes")
                    fields = _text(line, where).rstrip("\r\n").split("\t")
                    if len(fields) <= max(ai, ti):
                        raise Skip("bad_row", f"{len(fields)} fields, fewer than the header's")
                    rel, text = fields[ai].strip(), fields[ti].strip()
                    if not rel:
                        raise Skip("missing_audio", "the row names no clip")
                    if not text:
                        raise Skip("missing_transcript", f"{rel}: the row has no sentence")
                    audio = local_media(base, root, rel, self.opts.allow_outside_paths)
                    yield where, self._doc([("audio", audio)], text)
                except Skip as e:
                    yield where, e


READERS = {"jsonl": JsonlReader, "webdataset": WebDatasetReader, "parquet": ParquetReader, "hf": HFDiskReader,
           "imagefolder": ImageFolderReader, "librispeech": LibriSpeechReader, "commonvoice": CommonVoiceReader}
_SHARD_SUFFIXES = {"webdataset": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",), "jsonl": (".jsonl",),
                   "hf": (".arrow",)}


def detect_format(path: Path) -> str:
    """The format of an input, from its name (files) or its layout (folders)."""
    name = path.name.lower()
    if path.is_file():
        for fmt, suffixes in (("jsonl", (".jsonl", ".json", ".ndjson")), ("webdataset", (".tar", ".tar.gz", ".tgz")),
                              ("parquet", (".parquet",)), ("hf", (".arrow",)), ("commonvoice", (".tsv",))):
            if name.endswith(suffixes):
                return fmt
        raise TesseraError(f"cannot tell the format of {path} from its name: give --format "
                           f"({', '.join(FORMATS)})")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hf"
    top = [p.name.lower() for p in path.iterdir() if p.is_file()]
    for fmt in ("webdataset", "parquet"):
        if any(n.endswith(_SHARD_SUFFIXES[fmt]) for n in top):
            return fmt
    if next(path.rglob("*.trans.txt"), None) is not None:
        return "librispeech"
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
        return "imagefolder"
    raise TesseraError(f"cannot tell the format of the folder {path} (no tar or Parquet shards, saved dataset, "
                       f"*.trans.txt or images): give --format ({', '.join(FORMATS)})")


def open_readers(inputs: list, opts: ReaderOptions) -> list[Reader]:
    """A reader per input; a folder of tar, Parquet, JSONL or Arrow files becomes one reader per file, in
    sorted order."""
    if opts.format not in ("auto", *FORMATS):
        raise TesseraError(f"--format {opts.format!r} is not one of auto, {', '.join(FORMATS)}")
    unknown = sorted(set(opts.columns) - set(ROLES))
    if unknown:
        raise TesseraError(f"--column {unknown[0]}=...: the roles are {', '.join(ROLES)}")
    readers: list[Reader] = []
    for p in map(Path, inputs):
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
        fmt = detect_format(p) if opts.format == "auto" else opts.format
        saved = (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()
        if p.is_dir() and fmt in _SHARD_SUFFIXES and not (fmt == "hf" and saved):  # a folder of shards
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(_SHARD_SUFFIXES[fmt]))
            if not files:
                raise TesseraError(f"{p}: no {fmt} files ({', '.join(_SHARD_SUFFIXES[fmt])}) in the folder")
            readers += [READERS[fmt](f, opts) for f in files]
            continue
        if p.is_dir() and fmt == "commonvoice":
            raise TesseraError(f"{p}: the commonvoice format reads a TSV file (train.tsv, validated.tsv, ...)")
        if p.is_file() and fmt in ("imagefolder", "librispeech"):
            raise TesseraError(f"{p}: the {fmt} format reads a folder")
        readers.append(READERS[fmt](p, opts))
    return readers
