"""Readers: each corpus format gives the documents JSONL gives, token for token; the bad samples of each
format are counted skips with their reasons; every format resumes after an interruption.

The corpora are built here, offline: images with PIL, audio with soundfile, tars with tarfile, Parquet with
pyarrow. `tests/data/hf_saved` was written by the `datasets` package itself (`make_hf_saved.py`)."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from tessera.cli import main as cli
from tessera.data import readers as rd
from tessera.errors import TesseraError
from tessera.train import pretokenize as pt
from tessera.train.shards import ShardError, ShardReader

HF_SAVED = Path(__file__).parent / "data" / "hf_saved"


def png(seed: int, h: int, w: int) -> bytes:
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(b, format="PNG")
    return b.getvalue()


def sound(seed: int, n: int, sr: int, fmt: str = "WAV") -> bytes:
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    sf.write(b, (0.2 * rng.standard_normal(n)).astype(np.float32), sr, format=fmt,
             subtype="PCM_16" if fmt in ("WAV", "FLAC") else None)
    return b.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def cfg(**kw):
    return pt.PretokenizeConfig(**{"workers": 1, "docs_per_shard": 2, "device": "cpu", "max_audio_seconds": 5.0,
                                   **kw})


def token_docs(shards) -> list[list[int]]:
    r = ShardReader(shards)
    return [r.doc(i)[0].tolist() for i in range(r.n_docs)]


def reference(bundle, tmp_path: Path, docs: list[list]) -> list[list[int]]:
    """The token streams of `docs` pretokenized from JSONL: each document a list of strings (text) and
    (kind, bytes, extension) media, written to files beside the JSONL."""
    d = tmp_path / "reference"
    d.mkdir()
    lines = []
    for i, segs in enumerate(docs):
        out = []
        for j, s in enumerate(segs):
            if isinstance(s, str):
                out.append({"text": s})
            else:
                kind, data, ext = s
                (d / f"{i}_{j}.{ext}").write_bytes(data)
                out.append({kind: f"{i}_{j}.{ext}"})
        lines.append(json.dumps({"segments": out}))
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n")
    pt.pretokenize(bundle, [d / "docs.jsonl"], tmp_path / "reference_shards", cfg(), progress=False)
    return token_docs(tmp_path / "reference_shards")


IMAGES = [png(0, 32, 32), png(1, 40, 24), png(2, 24, 40)]
CAPTIONS = ["a first picture", "a second picture", "a third picture"]
CLIPS = [sound(4, 6400, 16000), sound(5, 4410, 22050)]
TRANSCRIPTS = ["one clip", "another clip"]
PAIRS = [[("image", im, "png"), c] for im, c in zip(IMAGES, CAPTIONS)]
SPEECH = [[("audio", a, "wav"), t] for a, t in zip(CLIPS, TRANSCRIPTS)]


# ------------------------------------------------------------------------------- the same documents as JSONL
@pytest.mark.parametrize("name", ["shard.tar", "shard.tar.gz"])
def test_a_webdataset_shard_gives_the_documents_of_its_jsonl(codec_bundle, tmp_path, name):
    flac = sound(5, 4410, 22050, "FLAC")
    members = [("000.png", IMAGES[0]), ("000.txt", CAPTIONS[0].encode()),
               ("001.png", IMAGES[1]), ("001.json", json.dumps({"caption": CAPTIONS[1], "width": 24}).encode()),
               ("sub/002.png", IMAGES[2]), ("sub/002.cls", b"3"), ("sub/002.txt", f" {CAPTIONS[2]}\n".encode()),
               ("003.wav", CLIPS[0]), ("003.txt", TRANSCRIPTS[0].encode()),
               ("004.flac", flac), ("004.txt", TRANSCRIPTS[1].encode()),
               ("005.txt", b"a text-only sample")]
    tar = write_tar(tmp_path / name, members)
    m = pt.pretokenize(codec_bundle, [tar], tmp_path / "s", cfg(), progress=False)  # 3 chunks: seeks into the tar
    assert m["docs"] == 6 and m["skipped"]["total"] == 0 and len(m["shards"]) == 3
    assert m["sources"] == [tmp_path.name]  # a shard's source is its folder: all shards of a corpus are one
    expected = reference(codec_bundle, tmp_path, PAIRS + SPEECH[:1] + [[("audio", flac, "flac"), TRANSCRIPTS[1]]]
                         + [["a text-only sample"]])
    assert token_docs(tmp_path / "s") == expected


def test_parquet_pairs_and_interleaved_rows_give_the_documents_of_their_jsonl(codec_bundle, tmp_path):
    pairs = pa.table({"image": IMAGES, "caption": CAPTIONS, "other": [1, 2, 3]})
    pq.write_table(pairs, tmp_path / "pairs.parquet", row_group_size=2)  # a chunk spans two row groups
    hf_style = pa.table({"image": [{"bytes": im, "path": None} for im in IMAGES[:2]], "text": CAPTIONS[:2]})
    pq.write_table(hf_style, tmp_path / "hf_style.parquet")
    named = pa.table({"pixels": IMAGES[2:], "alt": CAPTIONS[2:]})
    pq.write_table(named, tmp_path / "named.parquet")
    obelics = pa.table({"texts": [["before", None, "after"], [None, "a caption below"]],
                        "images": [[None, IMAGES[0], None], [IMAGES[2], None]]},
                       schema=pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(pa.binary()))]))
    pq.write_table(obelics, tmp_path / "obelics.parquet")
    speech = pa.table({"audio": CLIPS, "sentence": TRANSCRIPTS})
    pq.write_table(speech, tmp_path / "speech.parquet")
    got = []
    for f, kw in [("pairs", {}), ("hf_style", {}), ("named", {"columns": {"image": "pixels", "text": "alt"}}),
                  ("obelics", {}), ("speech", {})]:
        m = pt.pretokenize(codec_bundle, [tmp_path / f"{f}.parquet"], tmp_path / f"s_{f}", cfg(**kw), progress=False)
        assert m["skipped"]["total"] == 0, (f, m["skipped"])
        got += token_docs(tmp_path / f"s_{f}")
    expected = reference(codec_bundle, tmp_path, PAIRS + PAIRS[:2] + PAIRS[2:] + [
        ["before", ("image", IMAGES[0], "png"), "after"], [("image", IMAGES[2], "png"), "a caption below"]] + SPEECH)
    assert got == expected


def test_a_parquet_file_of_one_row_group_is_decoded_once_per_reader_not_once_per_chunk(tmp_path, monkeypatch):
    n = 5000
    pq.write_table(pa.table({"text": [f"caption {i}" for i in range(n)]}), tmp_path / "one.parquet",
                   row_group_size=n)
    pulled = []
    orig = pq.ParquetFile.iter_batches

    def counting(self, *a, **kw):
        for batch in orig(self, *a, **kw):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    reader = rd.ParquetReader(tmp_path / "one.parquet", cfg().reader_options())
    chunks = reader.plan(100)
    assert len(chunks) == n // 100
    texts = [doc.segments[0][1] for spec in chunks for _, doc in reader.records(spec)]
    assert texts == [f"caption {i}" for i in range(n)]
    assert sum(pulled) == n  # one pass (decoding each chunk from the group start pulled 133,648 rows)
    # a chunk out of order (another worker's) starts a fresh pass, and the rows are still right
    pulled.clear()
    assert [d.segments[0][1] for _, d in reader.records(chunks[3])] == [f"caption {i}" for i in range(300, 400)]
    assert [d.segments[0][1] for _, d in reader.records(chunks[1])] == [f"caption {i}" for i in range(100, 200)]
    assert sum(pulled) <= 400 + 256 + 200 + 256


def test_a_dataset_saved_by_hugging_face_datasets_gives_the_documents_of_its_jsonl(codec_bundle, tmp_path):
    # tests/data/hf_saved/make_hf_saved.py wrote these with datasets 5.2.0's save_to_disk
    pics = [png(0, 32, 32), png(1, 40, 24), png(2, 24, 40)]
    m = pt.pretokenize(codec_bundle, [HF_SAVED / "pictures"], tmp_path / "train", cfg(), progress=False)
    assert m["docs"] == 3 and m["sources"] == ["pictures/train"] and m["skipped"]["total"] == 0
    m = pt.pretokenize(codec_bundle, [HF_SAVED / "pictures"], tmp_path / "test", cfg(split="test"), progress=False)
    assert m["docs"] == 1
    m = pt.pretokenize(codec_bundle, [HF_SAVED / "speech"], tmp_path / "speech", cfg(), progress=False)
    assert m["docs"] == 2
    got = token_docs(tmp_path / "train") + token_docs(tmp_path / "test") + token_docs(tmp_path / "speech")
    expected = reference(codec_bundle, tmp_path, [
        [("image", pics[0], "png"), "a first picture"], [("image", pics[1], "png"), "a second picture"],
        [("image", pics[2], "png"), "a third picture"], [("image", png(3, 32, 32), "png"), "a held-out picture"],
        [("audio", sound(4, 6400, 16000), "wav"), "one clip"],
        [("audio", sound(5, 4410, 22050), "wav"), "another clip"]])
    assert got == expected
    with pytest.raises(TesseraError, match="splits train, test: choose one with --split"):
        pt.pretokenize(codec_bundle, [HF_SAVED / "pictures"], tmp_path / "x", cfg(split="validation"), progress=False)


def test_an_image_folder_with_sidecar_captions(codec_bundle, tmp_path):
    d = tmp_path / "pics"
    (d / "sub").mkdir(parents=True)
    (d / "a.png").write_bytes(IMAGES[0])
    (d / "a.txt").write_text(CAPTIONS[0] + "\n")
    (d / "sub" / "b.png").write_bytes(IMAGES[1])
    (d / "sub" / "b.txt").write_text(CAPTIONS[1])
    (d / "c.png").write_bytes(IMAGES[2])  # no caption
    (d / "d.png").write_bytes(IMAGES[2])
    (d / "d.txt").write_text("  \n")  # an empty caption
    (d / "e.png").write_bytes(IMAGES[2])
    (d / "e.txt").write_bytes(b"caf\xe9")  # not UTF-8
    (d / "f.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (d / "f.txt").write_text("broken")
    (tmp_path / "secret.png").write_bytes(IMAGES[0])
    (d / "g.png").symlink_to(tmp_path / "secret.png")  # a link out of the folder
    (d / "g.txt").write_text("outside")
    m = pt.pretokenize(codec_bundle, [d], tmp_path / "s", cfg(text_first=True), progress=False)
    assert m["docs"] == 2 and m["sources"] == ["pics"]
    assert m["skipped"]["counts"] == {"bad_text": 1, "corrupt": 1, "missing_caption": 2, "outside_root": 1}
    assert m["skipped"]["examples"]["missing_caption"][0].startswith("pics/c.png: c.txt")
    expected = reference(codec_bundle, tmp_path, [[c, ("image", im, "png")] for im, c in zip(IMAGES, CAPTIONS)][:2])
    assert token_docs(tmp_path / "s") == expected


def test_librispeech_and_common_voice_give_speech_documents(codec_bundle, tmp_path):
    ls = tmp_path / "LibriSpeech" / "dev" / "19" / "198"
    ls.mkdir(parents=True)
    (ls / "19-198.trans.txt").write_text("19-198-0000 ONE CLIP\n19-198-0001 ANOTHER CLIP\n19-198-0002 NO AUDIO\n")
    (ls / "19-198-0000.flac").write_bytes(sound(4, 6400, 16000, "FLAC"))
    (ls / "19-198-0001.flac").write_bytes(sound(5, 4410, 22050, "FLAC"))
    (ls / "19-198-0003.flac").write_bytes(sound(6, 1600, 16000, "FLAC"))  # no transcript line names it
    m = pt.pretokenize(codec_bundle, [tmp_path / "LibriSpeech"], tmp_path / "ls", cfg(), progress=False)
    assert m["docs"] == 2 and m["skipped"]["counts"] == {"missing": 1, "missing_transcript": 1}
    assert m["skipped"]["examples"]["missing"][0].startswith("LibriSpeech/dev/19/198/19-198.trans.txt:3:")

    cv = tmp_path / "cv" / "en"
    (cv / "clips").mkdir(parents=True)
    (cv / "clips" / "a.mp3").write_bytes(sound(7, 8000, 16000, "MP3"))
    (cv / "clips" / "b.wav").write_bytes(CLIPS[0])
    (cv / "clips" / "c.mp3").write_bytes(sound(8, 8000, 16000, "MP3"))
    rows = ["client_id\tpath\tsentence\tup_votes", "x\ta.mp3\tHello there.\t2", "x\tb.wav\tone clip\t1",
            "x\tc.mp3\t\t0", "x\tshort", "x\tgone.mp3\tA missing clip.\t1", "", "x\t../../secret.wav\tOut.\t1"]
    (cv / "train.tsv").write_text("\n".join(rows) + "\n")
    m = pt.pretokenize(codec_bundle, [cv / "train.tsv"], tmp_path / "cv_s", cfg(), progress=False)
    assert m["docs"] == 2 and m["sources"] == ["train"]
    assert m["skipped"]["counts"] == {"bad_row": 1, "missing": 1, "missing_transcript": 1, "outside_root": 1}
    assert m["skipped"]["examples"]["bad_row"][0].startswith("train.tsv:5:")
    expected = reference(codec_bundle, tmp_path, [
        [("audio", sound(4, 6400, 16000, "FLAC"), "flac"), "ONE CLIP"],
        [("audio", sound(5, 4410, 22050, "FLAC"), "flac"), "ANOTHER CLIP"],
        [("audio", (cv / "clips" / "a.mp3").read_bytes(), "mp3"), "Hello there."], SPEECH[0]])
    assert token_docs(tmp_path / "ls") + token_docs(tmp_path / "cv_s") == expected


# ------------------------------------------------------------------------------------- bad samples, counted
def test_bad_webdataset_samples_are_counted_skips(codec_bundle, tmp_path):
    good = [("004.png", IMAGES[0]), ("004.txt", b"kept")]
    members = [("000.png", b"\x89PNG\r\n\x1a\n truncated"), ("000.txt", b"undecodable image"),
               ("001.png", IMAGES[1]), ("001.json", b'{"caption": '),
               ("002.png", IMAGES[2]),  # no caption
               ("003.wav", CLIPS[0]), ("003.json", b'{"width": 3}'),  # no transcript field
               *good, ("005.png", IMAGES[1]), ("005.txt", b"after the damage"), ("006.txt", b"lost too")]
    tar = write_tar(tmp_path / "bad.tar", members)
    raw = bytearray(tar.read_bytes())
    with tarfile.open(tar) as tf:
        header = next(m for m in tf.getmembers() if m.name == "005.png").offset
    raw[header + 100:header + 108] = b"garbage!"  # its mode field: tarfile stops here without a word
    tar.write_bytes(bytes(raw))
    cut = write_tar(tmp_path / "cut.tar", good + [("007.png", IMAGES[2]), ("007.txt", b"cut off")])
    with tarfile.open(cut) as tf:
        data = next(m for m in tf.getmembers() if m.name == "007.png").offset_data
    cut.write_bytes(cut.read_bytes()[:data + 100])  # within 007.png's data
    m = pt.pretokenize(codec_bundle, [tar, cut], tmp_path / "s", cfg(), progress=False)
    assert m["docs"] == 2 and m["lines"] == 9  # 5 + 2 samples, and one damaged end in each tar
    assert m["skipped"]["counts"] == {"bad_json": 1, "corrupt": 1, "corrupt_tar": 3, "missing_caption": 1,
                                      "missing_transcript": 1}
    ex = m["skipped"]["examples"]
    assert ex["corrupt"][0].startswith("bad.tar:000: bad.tar:000.png: cannot decode image")
    assert any("damaged tar header at byte" in e for e in ex["corrupt_tar"])
    assert any(e.startswith("cut.tar:007:") for e in ex["corrupt_tar"])
    with pytest.raises(ShardError, match=r"bad.tar:000: .*--strict"):
        pt.pretokenize(codec_bundle, [tar], tmp_path / "strict", cfg(strict=True), progress=False)
    (tmp_path / "not.tar").write_bytes(b"this is not a tar file at all" * 40)
    m = pt.pretokenize(codec_bundle, [tmp_path / "not.tar"], tmp_path / "s2", cfg(), progress=False)
    assert m["docs"] == 0 and m["skipped"]["counts"] == {"corrupt_tar": 1}


def test_bad_parquet_rows_are_counted_skips(codec_bundle, tmp_path):
    schema = pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(pa.binary()))])
    rows = pa.table({"texts": [["a", None], ["a", None, "b"], ["a", "b"], None, ["see", None]],
                     "images": [[None, IMAGES[0]], [None, IMAGES[1]], [IMAGES[0], None], None,
                                [None, b"\xff\xd8junk"]]},
                    schema=schema)
    pq.write_table(rows, tmp_path / "interleaved.parquet")
    pairs = pa.table({"image": [IMAGES[0], None, IMAGES[1], b"\xff\xd8junk"],
                      "caption": ["kept", "no image", None, "undecodable"]})
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    urls = pa.table({"image": ["https://example.com/x.png", "../x.png"], "caption": ["a URL", "outside"]})
    pq.write_table(urls, tmp_path / "urls.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    inputs = [tmp_path / f"{n}.parquet" for n in ("interleaved", "pairs", "urls", "broken")]
    m = pt.pretokenize(codec_bundle, inputs, tmp_path / "s", cfg(), progress=False)
    assert m["docs"] == 2
    assert m["skipped"]["counts"] == {"bad_segment": 1, "corrupt": 2, "corrupt_parquet": 1, "empty": 1,
                                      "missing_caption": 1, "missing_image": 1, "mismatched_lengths": 1,
                                      "not_local": 1, "outside_root": 1}
    ex = m["skipped"]["examples"]
    assert ex["mismatched_lengths"][0] == "interleaved.parquet:row 1: 3 texts and 2 images"
    assert ex["bad_segment"][0].startswith("interleaved.parquet:row 2: position 0 holds both")
    assert ex["corrupt_parquet"][0].startswith("broken.parquet: broken.parquet: cannot be read")


def test_inputs_whose_format_or_columns_are_wrong_are_one_line_errors(codec_bundle, tmp_path, capsys):
    pq.write_table(pa.table({"pixels": IMAGES[:1], "words": ["x"]}), tmp_path / "p.parquet")
    (tmp_path / "notes.md").write_text("# notes")
    (tmp_path / "cv.tsv").write_text("client_id\tfile\ttext\n")
    for args, message in [
        (["--input", str(tmp_path / "p.parquet")], "no text column among pixels, words"),
        (["--input", str(tmp_path / "p.parquet"), "--column", "text=caption"], "no column 'caption'"),
        (["--input", str(tmp_path / "p.parquet"), "--column", "colour=red"], "give ROLE=NAME"),
        (["--input", str(tmp_path / "notes.md")], "cannot tell the format"),
        (["--input", str(tmp_path / "cv.tsv")], "no column 'path', 'sentence'"),
        (["--input", str(tmp_path / "p.parquet"), "--format", "imagefolder"], "reads a folder"),
    ]:
        rc = cli(["data", "pretokenize", "--tokenizer", str(codec_bundle), "--out", str(tmp_path / "s"),
                  "--workers", "1", "--device", "cpu", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and message in err, (args, err)


def test_formats_are_told_by_name_and_layout(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(b"")
    (tmp_path / "ls" / "1" / "2").mkdir(parents=True)
    (tmp_path / "ls" / "1" / "2" / "1-2.trans.txt").write_text("")
    (tmp_path / "tars").mkdir()
    for name in ("b.tar", "a.tar", "notes.txt"):
        (tmp_path / "tars" / name).write_bytes(b"")
    files = {"d.jsonl": "jsonl", "s.tar": "webdataset", "s.tgz": "webdataset", "s.tar.gz": "webdataset",
             "p.parquet": "parquet", "x.arrow": "hf", "train.tsv": "commonvoice"}
    for name, fmt in files.items():
        (tmp_path / name).write_bytes(b"")
        assert rd.detect_format(tmp_path / name) == fmt, name
    for name, fmt in {"pics": "imagefolder", "ls": "librispeech", "tars": "webdataset"}.items():
        assert rd.detect_format(tmp_path / name) == fmt, name
    assert rd.detect_format(HF_SAVED / "pictures") == "hf" and rd.detect_format(HF_SAVED / "speech") == "hf"
    readers = rd.open_readers([tmp_path / "tars"], rd.ReaderOptions())  # a folder of shards: each, sorted
    assert [r.name for r in readers] == ["a.tar", "b.tar"]


# ------------------------------------------------------------------------------------------------ resume
def _formats(tmp_path: Path) -> dict:
    tar = write_tar(tmp_path / "w.tar.gz", [m for i, im in enumerate(IMAGES + IMAGES)
                                            for m in ((f"{i:03d}.png", im), (f"{i:03d}.txt", f"caption {i}".encode()))])
    pq.write_table(pa.table({"image": IMAGES + IMAGES, "caption": [f"caption {i}" for i in range(6)]}),
                   tmp_path / "p.parquet", row_group_size=4)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(IMAGES + IMAGES):
        (folder / f"{i}.png").write_bytes(im)
        (folder / f"{i}.txt").write_text(f"caption {i}")
    return {"webdataset": tar, "parquet": tmp_path / "p.parquet", "imagefolder": folder, "hf": HF_SAVED / "speech"}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "imagefolder", "hf"])
def test_an_interrupted_run_of_each_format_resumes_and_matches(codec_bundle, tmp_path, monkeypatch, fmt):
    source = _formats(tmp_path)[fmt]
    c = cfg(docs_per_shard=1 if fmt == "hf" else 2)
    clean = pt.pretokenize(codec_bundle, [source], tmp_path / "clean", c, progress=False)
    real, calls = pt.write_shard, {"n": 0}

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pt, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(codec_bundle, [source], tmp_path / "s", c, progress=False)
    monkeypatch.setattr(pt, "write_shard", real)
    assert len(json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"]) == 1
    resumed = pt.pretokenize(codec_bundle, [source], tmp_path / "s", c, progress=False)
    assert resumed["docs"] == clean["docs"] and resumed["tokens"] == clean["tokens"]
    assert token_docs(tmp_path / "s") == token_docs(tmp_path / "clean")
    if fmt != "hf":  # a changed input is refused, not resumed into
        os.utime(source / "3.txt" if source.is_dir() else source, ns=(0, 0))
        with pytest.raises(ShardError, match="other inputs"):
            pt.pretokenize(codec_bundle, [source], tmp_path / "s", c, progress=False)


def test_arrow_files_of_either_ipc_format_are_read(tmp_path):
    table = pa.table({"text": ["a", "b", "c"]})
    with pa.ipc.new_file(tmp_path / "file.arrow", table.schema) as w:  # random-access ("Feather v2") format
        w.write_table(table)
    with pa.ipc.new_stream(tmp_path / "stream.arrow", table.schema) as w:  # the format datasets writes
        w.write_table(table, max_chunksize=2)
    for name in ("file.arrow", "stream.arrow"):
        reader = rd.open_readers([tmp_path / name], rd.ReaderOptions())[0]
        docs = [d for spec in reader.plan(2) for _, d in reader.records(spec)]
        assert [d.segments for d in docs] == [[("text", t, True)] for t in "abc"], name
