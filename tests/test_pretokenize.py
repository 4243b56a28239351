"""Pretokenization with real codecs: bad samples are counted, the rest is tokenized, runs resume."""

import json

import numpy as np
import pytest
import soundfile as sf
from fixtures import interrupt_shard_writes
from PIL import Image

from tessera.tokenizers import load_bundle
from tessera.train import pretokenize as pt
from tessera.train.shards import ShardError, ShardReader


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (4, 4), dtype=np.uint8)).save(d / "tiny.png")
    sf.write(d / "a.wav", (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
    sf.write(d / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    sf.write(d / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    good = [
        {"segments": [{"text": "the digit seven"}], "source": "text"},
        {"segments": [{"text": "a drawing of", "loss": False}, {"image": "a.png"}], "source": "draw"},
        {"segments": [{"audio": "a.wav"}, {"text": "seven"}], "source": "speech"},
        {"segments": [{"image": "a.png"}, {"audio": "a.wav"}, {"text": "x"}]},
    ]
    bad = ['{"segments": [{"text": "unterminated"}', json.dumps({"segments": [{"image": "missing.png"}]}),
           json.dumps({"segments": [{"audio": "corrupt.wav"}]}), json.dumps({"segments": [{"audio": "nan.wav"}]}),
           json.dumps({"segments": [{"audio": "long.wav"}]}), json.dumps({"segments": [{"image": "tiny.png"}]}),
           json.dumps({"segments": []}), json.dumps({"segments": [{"text": "a", "image": "a.png"}]})]
    lines = []
    for i in range(8):
        lines.append(json.dumps(good[i % 4]))
        lines.append(bad[i])
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return d


def cfg(**kw):
    return pt.PretokenizeConfig(workers=1, docs_per_shard=5, max_audio_seconds=2.0, device="cpu", **kw)


def test_bad_samples_are_counted_and_the_rest_tokenized(corpus, codec_bundle, tmp_path):
    m = pt.pretokenize(codec_bundle, [corpus / "docs.jsonl"], tmp_path / "s", cfg(), progress=False)
    assert m["complete"] and m["docs"] == 8 and m["lines"] == 16
    assert m["skipped"]["counts"] == {"bad_json": 1, "missing": 1, "corrupt": 1, "nonfinite": 1, "too_long": 1,
                                      "too_small": 1, "empty": 1, "bad_segment": 1}
    assert all(ex[0].startswith("docs.jsonl:") for ex in m["skipped"]["examples"].values())
    assert m["tokens"]["image"] > 0 and m["tokens"]["audio"] > 0 and m["tokens"]["text"] > 0
    reader = ShardReader(tmp_path / "s")
    tok = load_bundle(codec_bundle)
    # every document decodes back to its segments' kinds, and "loss": false masks exactly the prompt
    ids, mask = reader.doc(1)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    parts = tok.parse(ids.tolist(), strict=True)
    assert parts[0] == "a drawing of" and type(parts[1]).__name__ == "ImageCodes"
    n_prompt = 1 + len(tok.text.encode("a drawing of"))
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()
    assert sorted(m["sources"]) == ["docs", "draw", "speech", "text"]


def test_strict_stops_at_the_first_bad_sample(corpus, codec_bundle, tmp_path):
    with pytest.raises(ShardError, match=r"docs.jsonl:2: .*--strict"):
        pt.pretokenize(codec_bundle, [corpus / "docs.jsonl"], tmp_path / "s", cfg(strict=True), progress=False)


def test_interrupted_run_resumes_and_matches(corpus, codec_bundle, tmp_path, monkeypatch):
    clean = pt.pretokenize(codec_bundle, [corpus / "docs.jsonl"], tmp_path / "clean", cfg(), progress=False)
    restore = interrupt_shard_writes(monkeypatch, at=3)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(codec_bundle, [corpus / "docs.jsonl"], tmp_path / "s", cfg(), progress=False)
    restore()
    partial = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    resumed = pt.pretokenize(codec_bundle, [corpus / "docs.jsonl"], tmp_path / "s", cfg(), progress=False)
    for k in ("docs", "tokens", "skipped", "tokens_by_source"):
        assert resumed[k] == clean[k], k
    a, b = ShardReader(tmp_path / "clean"), ShardReader(tmp_path / "s")
    assert all(np.array_equal(a.doc(i)[0], b.doc(i)[0]) for i in range(a.n_docs))


def test_another_tokenizer_is_refused(corpus, codec_bundle, tmp_path, text_dir):
    from tessera.tokenizers import build_bundle

    pt.pretokenize(codec_bundle, [corpus / "docs.jsonl"], tmp_path / "s", cfg(), progress=False)
    build_bundle(tmp_path / "text_only", text_dir)
    with pytest.raises(ShardError, match="never mix tokenizers"):
        pt.pretokenize(tmp_path / "text_only", [corpus / "docs.jsonl"], tmp_path / "s", cfg(), progress=False)


def test_worker_processes_give_the_same_shards(corpus, codec_bundle, tmp_path):
    one = pt.pretokenize(codec_bundle, [corpus / "docs.jsonl"], tmp_path / "one", cfg(), progress=False)
    c = cfg()
    c.workers = 2
    two = pt.pretokenize(codec_bundle, [corpus / "docs.jsonl"], tmp_path / "two", c, progress=False)
    assert one["tokens"] == two["tokens"] and one["skipped"] == two["skipped"]
    a, b = ShardReader(tmp_path / "one"), ShardReader(tmp_path / "two")
    assert all(np.array_equal(a.doc(i)[0], b.doc(i)[0]) for i in range(a.n_docs))


def test_a_file_reused_across_documents_is_encoded_once_with_the_same_codes(codec_bundle, tmp_path, monkeypatch):
    d = tmp_path / "docs"
    d.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / "a.png")
    sf.write(d / "a.wav", (0.3 * np.sin(np.arange(8000) / 7)).astype(np.float32), 16000)
    docs = [{"segments": [{"image": "a.png"}, {"text": "seven"}]}, {"segments": [{"text": "draw"}, {"image": "a.png"}]},
            {"segments": [{"audio": "a.wav"}, {"image": "a.png"}]}, {"segments": [{"audio": "a.wav"}]}]
    (d / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in docs) + "\n")
    counts = {"image": 0, "audio": 0}
    tok_cls = type(load_bundle(codec_bundle))
    for kind in counts:
        real = getattr(tok_cls, f"encode_{kind}s")

        def counted(self, items, _real=real, _kind=kind):
            counts[_kind] += len(items)
            return _real(self, items)

        monkeypatch.setattr(tok_cls, f"encode_{kind}s", counted)
    m = pt.pretokenize(codec_bundle, [d / "docs.jsonl"], tmp_path / "s", cfg(), progress=False)
    assert m["docs"] == 4 and counts == {"image": 1, "audio": 1}
    tok = load_bundle(codec_bundle)
    reader = ShardReader(tmp_path / "s")
    spans = [[p for p in tok.parse(reader.doc(i)[0].tolist(), strict=True) if not isinstance(p, str)]
             for i in range(4)]
    image_codes = [spans[0][0], spans[1][0], spans[2][1]]
    assert all(np.array_equal(np.asarray(c.codes), np.asarray(image_codes[0].codes)) for c in image_codes)
    assert np.array_equal(np.asarray(spans[2][0].codes), np.asarray(spans[3][0].codes))
