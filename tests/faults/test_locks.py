"""One run per run directory, and an earlier run's metrics are not deleted without a flag."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from tessera.tokenizers import build_bundle
from tessera.train import pretrain
from tessera.runtime.checkpoint import CheckpointManager
from tessera.runtime.monitor import read_metrics
from tessera.train.pretokenize import PretokenizeConfig, pretokenize


@pytest.fixture(scope="module")
def data(tmp_path_factory, text_dir):
    d = tmp_path_factory.mktemp("locks")
    (d / "docs.jsonl").write_text("".join(json.dumps({"segments": [{"text": f"the digit {i % 10} is {i}"}]}) + "\n"
                                          for i in range(40)))
    build_bundle(d / "bundle", text_dir)
    pretokenize(d / "bundle", [d / "docs.jsonl"], d / "shards", PretokenizeConfig(workers=1), progress=False)
    return d


def args(data, out, *extra):
    return ["--preset", "tiny", "--tokenizer", str(data / "bundle"), "--data", str(data / "shards"),
            "--out", str(out), "--set", "seq_len=32", "--set", "batch_size=2", "--set", "log_every=1",
            "--device", "cpu", *extra]


def test_a_second_run_into_the_same_out_is_refused(data, tmp_path, capsys):
    """A run in progress holds --out; a second one exits 2 with one line naming the holder, and writes nothing,
    so config.json, the checkpoints and metrics.jsonl stay the first run's."""
    run, log = tmp_path / "run", tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen([sys.executable, "-m", "tessera.train.pretrain",
                                  *args(data, run, "--max-steps", "100000", "--set", "lr=1e-3")],
                                 stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not read_metrics(run):  # the first run is training
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run logged nothing in 600 s"
            time.sleep(0.05)
        rc = pretrain.main(args(data, run, "--max-steps", "3", "--set", "lr=2e-3"))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, "the second run was not refused"
        assert len(err) == 1 and "in use by another run" in err[0], err
        assert f"pid {first.pid} on {socket.gethostname()}" in err[0], err
        first.send_signal(signal.SIGTERM)  # saves a checkpoint and stops
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
        first.wait()
    config = json.loads((run / "config.json").read_text())
    _, state = CheckpointManager(run).load()
    assert config["train"]["lr"] == state["train"]["lr"] == 1e-3
    assert max(r["step"] for r in read_metrics(run)) == state["step"]
    # the lock went with the process that held it: --resume takes it
    assert pretrain.main(args(data, run, "--resume", "--max-steps", str(state["step"] + 1))) == 0


def test_a_fresh_run_keeps_the_metrics_of_an_earlier_run(data, tmp_path, capsys):
    """An earlier run that left metrics.jsonl but no checkpoint (killed before its first): a new run into the
    same --out is refused (one line naming --force) and leaves the file as it was; --force starts over, and so
    does --resume."""
    import shutil

    run = tmp_path / "run"
    assert pretrain.main(args(data, run, "--max-steps", "2")) == 0
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert pretrain.main(args(data, run, "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl" in err[0] and "--force" in err[0], err
    assert (run / "metrics.jsonl").read_bytes() == before
    assert pretrain.main(args(data, run, "--max-steps", "1", "--force")) == 0
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1]
    # --resume of a run without a checkpoint starts it over, and says so
    shutil.rmtree(run / "checkpoints")
    capsys.readouterr()
    assert pretrain.main(args(data, run, "--max-steps", "1", "--resume")) == 0
    assert "holds no checkpoint yet: starting from step 0" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1]
