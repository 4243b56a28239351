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
