"""Tools that show whether a model generalizes: augmentation, the near-copy check, real-data-only judges."""

import json
import random

import numpy as np
from PIL import Image

from tessera.data.digits import augment_image, augment_speech, digit_image
from tessera.eval.judges import corpus_split
from tessera.eval.memorization import memorization_report


def _digits(n, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.images))[:n]
    return [digit_image(d.images[i], 32) for i in idx], [int(d.target[i]) for i in idx]


def test_augment_image_keeps_format_and_varies():
    im = _digits(1)[0][0]
    rng = random.Random(0)
    outs = [augment_image(im, rng) for _ in range(4)]
    assert all(o.size == im.size and o.mode == "L" for o in outs)
    arrays = [np.asarray(o, np.float32) for o in outs]
    base = np.asarray(im, np.float32)
    assert all(np.abs(a - base).mean() > 1.0 for a in arrays)  # each variant differs from the original
    assert np.abs(arrays[0] - arrays[1]).mean() > 1.0  # and from each other
    assert all(a.max() >= 250 for a in arrays)  # the background stays white (fill colour)


def test_augment_speech_bounds_and_changes_level():
    w = (0.9 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    out = augment_speech(w, random.Random(1))
    assert out.dtype == np.float32 and out.shape == w.shape and np.abs(out).max() <= 1.0
    assert not np.allclose(out, w)


def test_near_copies_are_found_and_their_labels_checked():
    images, labels = _digits(300)
    train, train_labels, heldout = images[:200], labels[:200], images[200:]
    copies = memorization_report(train[:20], train_labels[:20], train, train_labels, heldout)
    assert copies["near_copy_share"] == 1.0 and copies["near_copy_label_agreement"] == 1.0
    wrong = memorization_report(train[:20], [(y + 1) % 10 for y in train_labels[:20]], train, train_labels, heldout)
    assert wrong["near_copy_label_agreement"] == 0.0
    fresh = memorization_report(heldout, labels[200:], train, train_labels, heldout)
    assert fresh["near_copy_share"] <= 0.15  # held-out images are near-copies at the 10% quantile rate
    noise = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8)) for i in range(10)]
    r = memorization_report(noise, [0] * 10, train, train_labels, heldout)
    assert r["near_copy_share"] == 0.0 and r["mean_distance"] > r["heldout_median_distance"]


def test_judges_train_on_real_files_only(tmp_path):
    meta = {"images": {"train": [{"path": "a.png", "label": 1}, {"path": "a_a0.png", "label": 1, "augmented": True}],
                       "test": []}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert [p.name for p, _ in corpus_split(tmp_path, "images", "train")] == ["a.png"]
    assert len(corpus_split(tmp_path, "images", "train", augmented=True)) == 2


def test_augmented_media_are_inputs_only():
    """Drawing, speaking and the image of speech->image use real media; warped ones only feed understanding."""
    from tessera.data.digits import _documents

    images = [("r0.png", 3), ("r0_a0.png", 3), ("r1.png", 4), ("r1_a0.png", 4)]
    clips = [("c0.wav", 3), ("c0_aug.wav", 3), ("c1.wav", 4)]
    augmented = {"r0_a0.png", "r1_a0.png", "c0_aug.wav"}
    source_of = {"r0_a0.png": "r0.png", "r1_a0.png": "r1.png"}
    docs = _documents(images, clips, random.Random(0), 5, 2, source_of, augmented)
    outputs = {d["source"]: set() for d in docs}
    inputs = {d["source"]: set() for d in docs}
    for d in docs:
        media = [s.get("image") or s.get("audio") for s in d["segments"] if "text" not in s]
        if d["source"] in ("draw", "speak"):
            outputs[d["source"]] |= set(media)
        elif d["source"] in ("speech_to_image", "image_to_speech"):
            inputs[d["source"]].add(media[0])
            outputs[d["source"]].add(media[1])
        else:
            inputs[d["source"]] |= set(media)
    assert all(not (o & augmented) for o in outputs.values())  # no augmented output anywhere
    assert outputs["draw"] == {"r0.png", "r1.png"} and len([d for d in docs if d["source"] == "draw"]) == 4
    assert {"r0_a0.png", "r1_a0.png"} <= inputs["caption"] and "c0_aug.wav" in inputs["transcribe"]
    assert "c0_aug.wav" in inputs["speech_to_image"]
    for d in docs:  # every media document is labelled with its media's digit
        if d["source"] != "text":
            assert d["label"] in (3, 4)
