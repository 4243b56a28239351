"""Filters, the image resolution policy and exact-duplicate removal: each counted in the manifest, each the
same for one process, a resumed run and a distributed run."""

import io
import json
import tarfile

import numpy as np
import pytest
from fixtures import interrupt_shard_writes
from PIL import Image

from tessera.tokenizers import load_bundle
from tessera.train import pretokenize as pt
from tessera.train.shards import ShardError, ShardReader
from tessera.unimodal.protocol import fit_image_area


def cfg(**kw):
    return pt.PretokenizeConfig(**{"workers": 1, "docs_per_shard": 2, "device": "cpu", **kw})


def png(seed: int, h: int, w: int) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(b, format="PNG")
    return b.getvalue()


def write_jsonl(d, docs):
    (d / "docs.jsonl").write_text("".join(json.dumps({"segments": s}) + "\n" for s in docs))
    return d / "docs.jsonl"


def test_fit_image_area_keeps_the_aspect_ratio_and_bounds_the_pixels():
    assert fit_image_area(64, 48, 8, 0, 64) == (64, 48)  # no bound: the codec's own policy
    assert fit_image_area(64, 48, 8, 1024, 64) == (32, 24)
    assert fit_image_area(1000, 250, 16, 256 * 256, 0) == (512, 128)
    w, h = fit_image_area(640, 480, 16, 200_000, 0)
    assert w * h <= 200_000 and w % 16 == h % 16 == 0 and abs(w / h - 4 / 3) < 0.05
    assert fit_image_area(10_000, 10, 8, 640, 0) == (80, 8)  # one code high, the rest of the budget wide
    assert fit_image_area(10, 10_000, 8, 640, 0) == (8, 80)


def test_image_filters_and_the_resolution_policy_are_counted_and_recorded(codec_bundle, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for name, (h, w) in {"ok": (40, 48), "small": (12, 12), "long": (16, 80), "big": (48, 64)}.items():
        (d / f"{name}.png").write_bytes(png(len(name), h, w))
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    docs = write_jsonl(d, [[{"text": n}, {"image": f"{n}.png"}] for n in ("ok", "small", "long", "big", "bad")])
    c = cfg(min_image_side=16, max_aspect_ratio=4.0, image_max_pixels=1024)
    m = pt.pretokenize(codec_bundle, [docs], tmp_path / "s", c, progress=False)
    assert m["docs"] == 2 and m["skipped"]["counts"] == {"corrupt": 1}
    assert m["filtered"]["counts"] == {"aspect_ratio": 1, "min_image_side": 1}
    assert m["filtered"]["examples"]["min_image_side"][0].startswith("docs.jsonl:2:")
    assert m["image_policy"]["factor"] == 8 and m["image_policy"]["max_pixels"] == 1024
    assert m["image_policy"]["max_side"] == 64 and m["image_policy"]["aspect_ratio"] == "kept"
    tok = load_bundle(codec_bundle)
    reader = ShardReader(tmp_path / "s")
    grids = [next(p for p in tok.parse(reader.doc(i)[0].tolist(), strict=True) if not isinstance(p, str)).codes.shape
             for i in range(2)]
    assert grids == [(3, 4), (3, 4)]  # 40x48 -> 24x32 (768 px) and 48x64 -> 24x32: at most 1024 pixels
    # filters leave samples out; they are no error under --strict
    docs = write_jsonl(d, [[{"text": n}, {"image": f"{n}.png"}] for n in ("ok", "small", "long")])
    m = pt.pretokenize(codec_bundle, [docs], tmp_path / "strict", cfg(min_image_side=16, max_aspect_ratio=4.0,
                                                                         strict=True), progress=False)
    assert m["docs"] == 1 and m["filtered"]["total"] == 2
    # without a policy, the same image keeps the codec's size: 48x64 stays 6x8 codes
    m = pt.pretokenize(codec_bundle, [docs], tmp_path / "plain", cfg(), progress=False)
    assert m["docs"] == 3 and m["filtered"]["total"] == 0 and m["image_policy"]["max_pixels"] is None


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    """JSONL and a tar whose documents repeat within a chunk, across chunks and across the two inputs."""
    d = tmp_path_factory.mktemp("dups")
    (d / "a.png").write_bytes(png(1, 32, 32))
    (d / "b.png").write_bytes(png(2, 32, 24))
    (d / "copy_of_a.png").write_bytes((d / "a.png").read_bytes())
    docs = [[{"text": "same"}], [{"text": "same"}], [{"image": "a.png"}, {"text": "a caption"}],
            [{"text": "other"}], [{"image": "copy_of_a.png"}, {"text": "a caption"}],  # a copy under another name
            [{"image": "a.png"}, {"text": "another caption"}],  # the same image, another document: kept
            [{"text": "same", "loss": False}],  # the same tokens with another mask: kept
            [{"image": "b.png"}, {"text": "b"}], [{"text": "same"}]]
    write_jsonl(d, docs)
    with tarfile.open(d / "shard.tar", "w") as tf:
        for name, data in (("0.png", (d / "b.png").read_bytes()), ("0.txt", b"b"),  # the JSONL's b document
                           ("1.png", (d / "a.png").read_bytes()), ("1.txt", b"new")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return [d / "docs.jsonl", d / "shard.tar"]


def test_exact_duplicates_are_dropped_in_input_order_for_any_number_of_parts(codec_bundle, duplicated, tmp_path,
                                                                            monkeypatch):
    plain = pt.pretokenize(codec_bundle, duplicated, tmp_path / "plain", cfg(), progress=False)
    one = pt.pretokenize(codec_bundle, duplicated, tmp_path / "one", cfg(dedup=True), progress=False)
    assert plain["docs"] == 11 and one["docs"] == 7
    assert one["filtered"]["counts"] == {"duplicate": 4} and one["skipped"]["total"] == 0
    assert one["filtered"]["examples"]["duplicate"][0].startswith("docs.jsonl:2:")
    assert one["filtered"]["examples"]["duplicate"][-1].startswith("shard.tar:0:")
    kept = [d.tolist() for d in map(lambda i: ShardReader(tmp_path / "one").doc(i)[0], range(7))]
    everything = [ShardReader(tmp_path / "plain").doc(i)[0].tolist() for i in range(11)]
    assert kept == [everything[i] for i in (0, 2, 3, 5, 6, 7, 10)]  # the first of each, in input order

    # two parts, each dropping its own repeats, then the merge the repeats across parts: the same set
    for r in range(2):
        pt.pretokenize(codec_bundle, duplicated, tmp_path / "two", cfg(dedup=True), rank=r, world_size=2,
                       progress=False)
    merged = json.loads((tmp_path / "two" / "manifest.json").read_text())
    for key in ("docs", "tokens", "tokens_by_source", "sources", "shards"):
        assert merged[key] == one[key], key
    assert merged["filtered"]["counts"] == one["filtered"]["counts"]
    for f in (tmp_path / "one").glob("s*_*"):
        assert f.read_bytes() == (tmp_path / "two" / f.name).read_bytes(), f.name

    # a resumed run remembers what it kept before the interruption
    restore = interrupt_shard_writes(monkeypatch, at=3)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(codec_bundle, duplicated, tmp_path / "resumed", cfg(dedup=True), progress=False)
    restore()
    resumed = pt.pretokenize(codec_bundle, duplicated, tmp_path / "resumed", cfg(dedup=True), progress=False)
    assert resumed["docs"] == one["docs"] and resumed["filtered"]["counts"] == one["filtered"]["counts"]
    assert [ShardReader(tmp_path / "resumed").doc(i)[0].tolist() for i in range(7)] == kept
    with pytest.raises(ShardError, match="other inputs or settings"):  # dedup on and off never mix
        pt.pretokenize(codec_bundle, duplicated, tmp_path / "resumed", cfg(), progress=False)
