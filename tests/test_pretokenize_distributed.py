"""Distributed pretokenization: W ranks each encode chunks k with k % W == rank into OUT/part-RANK/, each part
resumes on its own, and the merge writes the shard set one process writes, file for file."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from fixtures import interrupt_shard_writes
from PIL import Image

from tessera.cli import main as cli
from tessera.tokenizers import load_bundle
from tessera.train import pretokenize as pt
from tessera.train.loader import LoaderConfig, PackedLoader
from tessera.train.shards import ShardError, ShardReader

REPO = Path(__file__).resolve().parents[1]


def cfg(**kw):
    return pt.PretokenizeConfig(**{"workers": 1, "docs_per_shard": 2, "device": "cpu", "max_audio_seconds": 5.0,
                                   **kw})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A JSONL file with sources and bad lines, two tar shards and a Parquet file: 11 chunks of 2 records."""
    d = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)

    def png(h, w):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(b, format="PNG")
        return b.getvalue()

    (d / "a.png").write_bytes(png(32, 32))
    sf.write(d / "a.wav", (0.2 * rng.standard_normal(4800)).astype(np.float32), 16000)
    docs = [{"segments": [{"text": "the digit seven"}], "source": "text"},
            {"segments": [{"text": "a drawing of", "loss": False}, {"image": "a.png"}], "source": "draw"},
            "{not json", {"segments": [{"audio": "a.wav"}, {"text": "seven"}], "source": "speech"},
            {"segments": [{"image": "missing.png"}]}, {"segments": [{"text": "plain"}]},
            {"segments": [{"image": "a.png"}, {"text": "again"}], "source": "draw"}]
    (d / "docs.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in docs))
    (d / "tars").mkdir()
    for t in range(2):
        with tarfile.open(d / "tars" / f"shard-{t}.tar", "w") as tf:
            for i in range(3):
                members = ((f"{t}{i:02d}.png", png(24 + 8 * i, 32)), (f"{t}{i:02d}.txt", f"tar {t} {i}".encode()))
                for name, data in members:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    pq.write_table(pa.table({"image": [png(32, 24) for _ in range(4)] + [b"junk"],
                             "caption": [f"row {i}" for i in range(5)]}), d / "rows.parquet")
    return [d / "docs.jsonl", d / "tars", d / "rows.parquet"]


def run_parts(bundle, inputs, out, world, **kw):
    return [pt.pretokenize(bundle, inputs, out, cfg(**kw), rank=r, world_size=world, progress=False)
            for r in range(world)]


def test_two_parts_and_their_merge_equal_one_process(codec_bundle, inputs, tmp_path):
    one = pt.pretokenize(codec_bundle, inputs, tmp_path / "one", cfg(), progress=False)
    assert len(one["shards"]) == 11 and one["skipped"]["total"] == 3
    p0 = pt.pretokenize(codec_bundle, inputs, tmp_path / "two", cfg(), rank=0, world_size=2, progress=False)
    assert not (tmp_path / "two" / "manifest.json").exists()  # part 1 has not run: nothing to merge yet
    assert [s["chunk"] for s in p0["shards"]] == [0, 2, 4, 6, 8, 10] and "merged" not in p0
    p1 = pt.pretokenize(codec_bundle, inputs, tmp_path / "two", cfg(), rank=1, world_size=2, progress=False)
    assert [s["chunk"] for s in p1["shards"]] == [1, 3, 5, 7, 9] and p1["merged"]  # the last part merges
    merged = json.loads((tmp_path / "two" / "manifest.json").read_text())
    # the merged set is the one-process set, file for file: tokens, offsets, masks, sources, source lists
    names = sorted(f.name for f in (tmp_path / "one").iterdir() if f.name not in ("manifest.json", ".lock"))
    assert names == sorted(f.name for f in (tmp_path / "two").iterdir() if f.is_file()
                           and f.name not in ("manifest.json", ".lock"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    for key in ("docs", "lines", "tokens", "tokens_by_source", "sources", "shards", "inputs", "tokenizer_hash"):
        assert merged[key] == one[key], key
    assert merged["skipped"]["counts"] == one["skipped"]["counts"] and merged["complete"]
    assert [p["dir"] for p in merged["parts"]] == ["part-00000", "part-00001"]
    # token for token, in the documented order: chunk by chunk, as the inputs list them
    a, b = ShardReader(tmp_path / "one"), ShardReader(tmp_path / "two")
    assert a.n_docs == b.n_docs == one["docs"]
    assert all(np.array_equal(a.doc(i)[0], b.doc(i)[0]) and np.array_equal(a.doc(i)[1], b.doc(i)[1])
               for i in range(a.n_docs))
    # the training loader reads it as one shard set
    layout = load_bundle(codec_bundle).layout
    lc = LoaderConfig(seq_len=64, batch_size=2, seed=3)
    x, y = PackedLoader(tmp_path / "one", lc, layout), PackedLoader(tmp_path / "two", lc, layout)
    for _ in range(3):
        bx, by = x.next_batch(), y.next_batch()
        assert all(np.array_equal(bx[k].numpy(), by[k].numpy()) for k in bx)


def test_each_part_resumes_on_its_own_after_a_kill(codec_bundle, inputs, tmp_path, monkeypatch):
    run_parts(codec_bundle, inputs, tmp_path / "clean", 3)
    out = tmp_path / "s"
    pt.pretokenize(codec_bundle, inputs, out, cfg(), rank=0, world_size=3, progress=False)
    restore = interrupt_shard_writes(monkeypatch, at=3)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(codec_bundle, inputs, out, cfg(), rank=2, world_size=3, progress=False)
    restore()
    assert len(json.loads((out / "part-00002" / "manifest.json").read_text())["shards"]) == 2
    with pytest.raises(ShardError, match="parts 1, 2 of 3 are not finished"):
        pt.merge_parts(out)
    with pytest.raises(ShardError, match="is part 2 of 3, not part 2 of 4"):  # another split of the chunks
        pt.pretokenize(codec_bundle, inputs, out, cfg(), rank=2, world_size=4, progress=False)
    pt.pretokenize(codec_bundle, inputs, out, cfg(), rank=2, world_size=3, progress=False)  # resumes
    m = pt.pretokenize(codec_bundle, inputs, out, cfg(), rank=1, world_size=3, progress=False)
    assert m["merged"]
    a, b = ShardReader(tmp_path / "clean"), ShardReader(out)
    assert a.n_docs == b.n_docs and all(np.array_equal(a.doc(i)[0], b.doc(i)[0]) for i in range(a.n_docs))


def test_ranks_from_torchrun_and_the_merge_command(codec_bundle, inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    args = ["data", "pretokenize", "--tokenizer", str(codec_bundle), "--out", str(out), "--workers", "1",
            "--docs-per-shard", "2", "--device", "cpu", "--max-audio-seconds", "5", "--input", *map(str, inputs)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # as torchrun sets them
    assert cli(args) == 0
    assert (out / "part-00001" / "manifest.json").is_file() and not (out / "part-00000").exists()
    assert cli(["data", "pretokenize-merge", str(out)]) == 2
    assert "parts 0 of 2 are not finished" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert cli([*args, "--rank", "0", "--world-size", "2"]) == 0  # as a cluster scheduler passes them
    capsys.readouterr()
    assert cli(["data", "pretokenize-merge", str(out)]) == 0  # merged already: the same set again
    assert "2 parts merged" in capsys.readouterr().out
    one = pt.pretokenize(codec_bundle, inputs, tmp_path / "one", cfg(), progress=False)
    assert json.loads((out / "manifest.json").read_text())["tokens"] == one["tokens"]
    # one process into the parts' directory: it is a complete shard set made from the same inputs
    assert pt.pretokenize(codec_bundle, inputs, out, cfg(), progress=False)["docs"] == one["docs"]
    # the merged set refuses parts of another run, and a one-process set refuses parts
    with pytest.raises(ShardError, match="one-process run"):
        pt.pretokenize(codec_bundle, inputs, tmp_path / "one", cfg(), rank=0, world_size=2, progress=False)
    assert cli([*args, "--rank", "2", "--world-size", "2"]) == 2
    assert "--rank 2 is not in [0, --world-size 2)" in capsys.readouterr().err


def test_ranks_that_run_at_once_leave_one_merged_set(codec_bundle, inputs, tmp_path):
    out = tmp_path / "s"
    args = [sys.executable, "-m", "tessera", "data", "pretokenize", "--tokenizer", str(codec_bundle), "--out", str(out),
            "--workers", "1", "--docs-per-shard", "2", "--device", "cpu", "--max-audio-seconds", "5",
            "--input", *map(str, inputs)]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    procs = [subprocess.Popen(args, env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                             PYTHONPATH=path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    merged = json.loads((out / "manifest.json").read_text())
    one = pt.pretokenize(codec_bundle, inputs, tmp_path / "one", cfg(), progress=False)
    assert merged["complete"] and merged["tokens"] == one["tokens"] and merged["shards"] == one["shards"]
    a, b = ShardReader(tmp_path / "one"), ShardReader(out)
    assert all(np.array_equal(a.doc(i)[0], b.doc(i)[0]) for i in range(a.n_docs))
