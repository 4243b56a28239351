"""Pretokenize under faults: a dead worker ends the run, concurrent runs never share files, memory is bounded."""

import json
import os
import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tessera.cli import main as cli
from tessera.train import pretokenize as pt
from tessera.train import shards
from tessera.train.shards import ShardError, ShardReader

REPO = Path(__file__).resolve().parents[2]


def cfg(**kw):
    return pt.PretokenizeConfig(**{"workers": 1, "docs_per_shard": 2, "device": "cpu", **kw})


def write_docs(path, n=8):
    path.write_text("".join(json.dumps({"segments": [{"text": f"digit {i}"}]}) + "\n" for i in range(n)))
    return path


def same_tokens(a, b) -> bool:
    ra, rb = ShardReader(a), ShardReader(b)
    return ra.n_docs == rb.n_docs and all(np.array_equal(ra.doc(i)[0], rb.doc(i)[0]) for i in range(ra.n_docs))


# ----------------------------------------------------------------------------------------- dead workers
def test_a_killed_worker_ends_the_run_with_one_line_and_a_rerun_resumes(tmp_path, text_bundle):
    docs = write_docs(tmp_path / "docs.jsonl")
    out = tmp_path / "s"
    env = dict(os.environ, TESSERA_TEST_KILL_AT="docs.jsonl:5",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "tessera", "data", "pretokenize", "--tokenizer", str(text_bundle), "--input",
           str(docs), "--out", str(out), "--workers", "2", "--docs-per-shard", "2", "--device", "cpu"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail("pretokenize still waited on its dead worker after 120 s")
    last = err.strip().splitlines()[-1]
    assert p.returncode == 2, err
    assert last.startswith("error: ") and "docs.jsonl lines 5-6" in last and "resume" in last, last
    m = pt.pretokenize(text_bundle, [docs], out, cfg(), progress=False)  # the same command, no fault: resumes
    assert m["complete"] and m["docs"] == 8
    pt.pretokenize(text_bundle, [docs], tmp_path / "clean", cfg(), progress=False)
    assert same_tokens(out, tmp_path / "clean")


# ------------------------------------------------------------------------------------ concurrent writers
def test_two_writers_of_one_shard_file_do_not_share_a_temporary_file(tmp_path, monkeypatch):
    # both writers have their file open before either renames it: with one fixed temporary name, the second
    # truncates the first's file and then finds nothing to rename
    both_open = threading.Barrier(2, timeout=10)
    real_fsync = os.fsync

    def fsync(fd):
        both_open.wait()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    a, b = np.arange(100, dtype=np.uint32), np.arange(60, dtype=np.uint32) + 7
    errors = []

    def write(arr):
        try:
            shards._atomic_array(tmp_path / "shard_00000.tokens", arr)
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=write, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    got = np.fromfile(tmp_path / "shard_00000.tokens", dtype=np.uint32)
    assert np.array_equal(got, a) or np.array_equal(got, b)
    assert [p.name for p in tmp_path.iterdir()] == ["shard_00000.tokens"]  # no temporary file left


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, text_bundle, monkeypatch, capsys):
    docs = write_docs(tmp_path / "docs.jsonl")
    out = tmp_path / "s"
    real = pt.write_shard
    first_writing, go_on = threading.Event(), threading.Event()

    def slow_write(*a, **k):  # the first run pauses in its first shard write
        if threading.current_thread().name == "first":
            first_writing.set()
            assert go_on.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(pt, "write_shard", slow_write)
    result = {}
    t = threading.Thread(name="first", target=lambda: result.setdefault(
        "m", pt.pretokenize(text_bundle, [docs], out, cfg(), progress=False)))
    t.start()
    try:
        assert first_writing.wait(60)
        rc = cli(["data", "pretokenize", "--tokenizer", str(text_bundle), "--input", str(docs), "--out", str(out),
                  "--workers", "1", "--docs-per-shard", "2", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert "in use" in err and f"pid {os.getpid()}" in err, err
        with pytest.raises(ShardError, match="in use"):  # --force does not take it over either
            pt.pretokenize(text_bundle, [docs], out, cfg(), force=True, progress=False)
    finally:
        go_on.set()
        t.join(60)
    assert result["m"]["complete"] and result["m"]["docs"] == 8
    pt.pretokenize(text_bundle, [docs], tmp_path / "clean", cfg(), progress=False)
    assert same_tokens(out, tmp_path / "clean")


def test_the_out_lock_is_released_when_its_holder_dies(tmp_path, text_bundle):
    docs = write_docs(tmp_path / "docs.jsonl")
    out = tmp_path / "s"
    out.mkdir()
    hold = ("import sys, time; from tessera.train.shards import lock_output_dir; "
            "lock = lock_output_dir(sys.argv[1]); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])),
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ShardError, match=f"in use .*pid {holder.pid}"):
            pt.pretokenize(text_bundle, [docs], out, cfg(), progress=False)
    finally:
        holder.kill()
        holder.wait(30)
    m = pt.pretokenize(text_bundle, [docs], out, cfg(), progress=False)  # the dead holder's lock file is stale
    assert m["complete"] and m["docs"] == 8


# ----------------------------------------------------------------------------------------------- memory
@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    docs = []
    for i in range(16):  # 16 clips of about 4 s: 256 kB each once decoded, 4 MB in all
        sf.write(d / f"c{i}.wav", (0.2 * rng.standard_normal(64_000 - 10 * i)).astype(np.float32), 16000)
        docs.append({"segments": [{"text": f"clip {i}"}, {"audio": f"c{i}.wav"}]})
    docs.append({"segments": [{"audio": "c3.wav"}, {"text": "again"}]})  # a repeat: encoded once
    (d / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    return d / "docs.jsonl"


def test_a_chunk_of_long_clips_is_encoded_in_pieces_that_fit_the_media_budget(tmp_path, codec_bundle, long_clips):
    clip = 64_000 * 4
    budget = 2 * clip + clip // 2  # two and a half clips: a piece is encoded once it holds more

    def run(out, **kw):
        tracemalloc.start()
        try:
            pt.pretokenize(codec_bundle, [long_clips], tmp_path / out, cfg(docs_per_shard=64, **kw), progress=False)
            return tracemalloc.get_traced_memory()[1], dict(pt._W["stats"])
        finally:
            tracemalloc.stop()

    run("warm")  # imports and first calls out of the measurements
    peak_small, small = run("small", max_media_bytes=budget)
    peak_whole, whole = run("whole")
    assert small["peak_media_bytes"] <= budget + clip and small["budget_flushes"] == 5, small
    assert whole["peak_media_bytes"] > 15 * clip and whole["budget_flushes"] == 0, whole
    assert peak_whole - peak_small > 8 * clip, (peak_small, peak_whole)  # measured apart from the counter
    # clips of different lengths never share a batch, so encoding them early changes no code
    assert same_tokens(tmp_path / "small", tmp_path / "whole")
    a, b = ShardReader(tmp_path / "small"), ShardReader(tmp_path / "whole")
    assert all(np.array_equal(a.doc(i)[1], b.doc(i)[1]) for i in range(a.n_docs))
