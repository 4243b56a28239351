"""Commands delete only directories they made, unless a flag names the directory as disposable."""

import json

import pytest

from tessera.cli import main as cli
from tessera.data import digits
from tessera.tokenizers import build_bundle
from tessera.tokenizers.bundle import BundleError
from tessera.train.pretokenize import PretokenizeConfig, pretokenize
from tessera.train.shards import ShardError


def test_digits_refuses_a_directory_of_user_files(tmp_path, monkeypatch, capsys):
    def no_speech(*a, **k):
        raise AssertionError("the build started")

    monkeypatch.setattr(digits, "check_espeak", lambda: "espeak-ng")
    monkeypatch.setattr(digits, "speak", no_speech)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    assert cli(["data", "digits", "--out", str(out), "--fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a digits corpus" in err and "--force" in err and len(err.splitlines()) == 1
    assert (out / "thesis.txt").read_text() == "years of work"


def test_digits_replaces_its_own_interrupted_build(tmp_path, monkeypatch):
    # the refusal above must not stop a rerun over a build that was interrupted (no meta.json yet)
    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(digits, "check_espeak", lambda: "espeak-ng")
    out = tmp_path / "corpus"
    cfg = digits.DigitsConfig.fast()
    cfg.max_images = 12
    monkeypatch.setattr(digits, "speak", stop)
    with pytest.raises(Stop):
        digits.build_digits_corpus(out, cfg, progress=False)
    assert (out / digits.BUILD_MARKER).exists() and not (out / "meta.json").exists()
    with pytest.raises(Stop):  # not refused: the directory is an unfinished corpus
        digits.build_digits_corpus(out, cfg, progress=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, text_dir):
    d = tmp_path_factory.mktemp("bundle")
    build_bundle(d / "bundle", text_dir)
    return d / "bundle"


def _docs(path, n=4):
    path.write_text("".join(json.dumps({"segments": [{"text": f"digit {i}"}]}) + "\n" for i in range(n)))
    return path


def test_pretokenize_force_refuses_an_out_that_holds_its_input(tmp_path, bundle):
    docs = _docs(tmp_path / "docs.jsonl")
    with pytest.raises(ShardError, match="holds the input"):
        pretokenize(bundle, [docs], tmp_path, PretokenizeConfig(workers=1), force=True, progress=False)
    assert docs.is_file()


def test_pretokenize_force_refuses_an_out_that_is_not_a_shard_set(tmp_path, bundle):
    docs = _docs(tmp_path / "docs.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="not a shard set"):
        pretokenize(bundle, [docs], out, PretokenizeConfig(workers=1), force=True, progress=False)
    assert (out / "notes.txt").is_file()
    # a real shard set is still replaced by --force
    shards = tmp_path / "shards"
    pretokenize(bundle, [docs], shards, PretokenizeConfig(workers=1), progress=False)
    m = pretokenize(bundle, [_docs(docs, 6)], shards, PretokenizeConfig(workers=1), force=True, progress=False)
    assert m["docs"] == 6


def test_tokenizer_build_force_replaces_only_a_bundle(tmp_path, text_dir, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    assert cli(["tokenizer", "build", "--text", str(text_dir), "--out", str(out), "--force"]) == 2
    assert "not a tokenizer bundle" in capsys.readouterr().err
    assert (out / "cat.jpg").is_file()
    with pytest.raises(BundleError, match="not a tokenizer bundle"):
        build_bundle(out, text_dir, force=True)
    build_bundle(tmp_path / "b", text_dir)
    build_bundle(tmp_path / "b", text_dir, max_grid=8, force=True)  # a bundle is still replaced


# ------------------------------------------------------------------------- trainers and the export
@pytest.fixture(scope="module")
def shards(tmp_path_factory, bundle):
    d = tmp_path_factory.mktemp("shards")
    pretokenize(bundle, [_docs(d / "docs.jsonl", 8)], d / "shards", PretokenizeConfig(workers=1), progress=False)
    return d / "shards"


def _pretrain(bundle, shards, out):
    return cli(["train", "--preset", "tiny", "--tokenizer", str(bundle), "--data", str(shards), "--out", str(out),
                "--max-steps", "1", "--set", "seq_len=32", "--set", "batch_size=1", "--device", "cpu", "--compile",
                "off"])


@pytest.mark.parametrize("where", ["shards", "bundle", "inside the shards", "user files"])
def test_pretrain_refuses_an_out_that_is_an_input_or_holds_user_files(tmp_path, bundle, shards, where, capsys):
    before = {p: p.stat().st_mtime_ns for p in (*shards.rglob("*"), *bundle.rglob("*"))}
    out = {"shards": shards, "bundle": bundle, "inside the shards": shards / "run",
           "user files": tmp_path / "mine"}[where]
    if where == "user files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert _pretrain(bundle, shards, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert ("not a training run" if where == "user files" else "the input") in err, err
    assert {p: p.stat().st_mtime_ns for p in (*shards.rglob("*"), *bundle.rglob("*"))} == before
    assert not (shards / "run").exists() and not (shards / "config.json").exists()


def test_codec_training_refuses_its_own_data_directory_and_user_files(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 60, 0, 0)).save(data / f"{i}.png")
    mine = tmp_path / "text_tokenizer"
    mine.mkdir()
    (mine / "spm.model").write_bytes(b"not a codec")
    for out in (data, data / "run", mine):
        assert cli(["tokenizer", "train", "image", "--data", str(data), "--out", str(out), "--max-steps", "1",
                    "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("the input" in err or "not an image codec run" in err), err
    assert sorted(p.name for p in data.iterdir()) == [f"{i}.png" for i in range(4)]
    assert sorted(p.name for p in mine.iterdir()) == ["spm.model"]


def test_export_force_replaces_only_an_export_and_never_the_run(tmp_path, bundle, shards, capsys):
    run = tmp_path / "run"
    assert _pretrain(bundle, shards, run) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    assert cli(["export", "hf", "--model", str(run), "--out", str(mine), "--force"]) == 2
    assert "not a Hugging Face export" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "important"
    assert cli(["export", "hf", "--model", str(run), "--out", str(run), "--force"]) == 2
    assert "the input" in capsys.readouterr().err
    assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
    assert cli(["export", "hf", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert cli(["export", "hf", "--model", str(run), "--out", str(tmp_path / "hf"), "--force"]) == 0  # replaced


def test_text_tokenizer_training_refuses_a_directory_of_user_files(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"the digit {i % 10} is written {i}\n" for i in range(300)))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    argv = ["tokenizer", "train", "text", "--input", str(text), "--vocab-size", "300", "--out"]
    assert cli([*argv, str(mine)]) == 2
    assert "not a text tokenizer" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert cli([*argv, str(tmp_path / "tok")]) == 0
    assert cli([*argv, str(tmp_path / "tok")]) == 0  # a text tokenizer is still replaced, as the demo reruns it
