"""Evaluation harness pieces: tasks as data, the text judge, judges trained on real data only."""

import json

import numpy as np
import pytest

from tessera.eval.harness import Judges, format_table
from tessera.eval.tasks import DIGIT_TASKS, TaskError, TaskItem, digit_in_text, digits_tasks, load_tasks, save_tasks


def test_digit_in_text():
    assert digit_in_text("a drawing of the digit seven") == 7
    assert digit_in_text("what digit is this? 3.") == 3
    assert digit_in_text("Seven") == 7 and digit_in_text("the word zero, then one") == 0
    assert digit_in_text("sevens everywhere") is None and digit_in_text("") is None
    assert digit_in_text("someone says eight") == 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tessera.data.digits import DigitsConfig, build_digits_corpus

    d = tmp_path_factory.mktemp("digits")
    cfg = DigitsConfig.fast()
    cfg.max_images = 200
    build_digits_corpus(d, cfg, progress=False)
    return d


def test_corpus_holds_out_voices_and_mixes_directions(corpus):
    meta = json.loads((corpus / "meta.json").read_text())
    train_voices = {p["path"].split("/")[-1].split("_")[0] for p in meta["speech"]["train"]}
    test_voices = {p["path"].split("/")[-1].split("_")[0] for p in meta["speech"]["test"]}
    assert train_voices and test_voices and not (train_voices & test_voices)
    train_var = {p["path"].split("/")[-1].split("_")[1] for p in meta["speech"]["train"]}
    test_var = {p["path"].split("/")[-1].split("_")[1] for p in meta["speech"]["test"]}
    assert not (train_var & test_var)
    assert set(meta["counts"]["sources"]) == {"caption", "draw", "transcribe", "speak", "speech_to_image",
                                              "image_to_speech", "text"}
    docs = [json.loads(line) for line in (corpus / "documents.jsonl").read_text().splitlines()]
    test_paths = {e["path"] for e in meta["images"]["test"]} | {e["path"] for e in meta["speech"]["test"]}
    used = {seg.get("image") or seg.get("audio") for d in docs for seg in d["segments"]} - {None}
    assert not (used & test_paths)  # no held-out image or clip leaks into training documents


def test_tasks_round_trip_and_validate(corpus, tmp_path):
    items = digits_tasks(corpus)
    assert {i.task for i in items} == set(DIGIT_TASKS)
    save_tasks(items, tmp_path / "t.jsonl")
    loaded, base = load_tasks(tmp_path / "t.jsonl")
    assert loaded == items and base == tmp_path
    with pytest.raises(TaskError, match="needs the key 'judge'"):
        TaskItem.from_dict({"task": "x", "prompt": [], "label": 1})
    with pytest.raises(TaskError, match="exactly one of"):
        TaskItem.from_dict({"task": "x", "prompt": [{"text": "a", "image": "b"}], "label": 1, "judge": "text_digit"})


def test_judges_are_accurate_on_real_held_out_data_and_reject_noise(corpus):
    from tessera.eval.judges import ImageDigitJudge, SpeechDigitJudge, corpus_images
    from tessera.unimodal.media import load_image

    judges = Judges(corpus)
    assert judges.heldout_accuracy("image_digit") >= 0.95
    assert judges.heldout_accuracy("speech_digit") >= 0.95
    # a verdict on outputs: correct label -> True, wrong label -> False, missing media -> False
    pairs = corpus_images(corpus, "test")[:10]
    ims = [[load_image(p)] for p, _ in pairs]
    labels = [y for _, y in pairs]
    v_right = judges.verdicts("image_digit", ims, labels)
    v_wrong = judges.verdicts("image_digit", ims, [(y + 1) % 10 for y in labels])
    assert sum(v_right) >= 9 and sum(v_wrong) <= 1
    assert judges.verdicts("image_digit", [["no image"]], [3]) == [False]
    assert judges.verdicts("text_digit", [["it is 7"], ["eight"]], [7, 9]) == [True, False]


def test_table_formatting():
    t = format_table({"caption_acc": {"value": 0.9, "n": 10}, "draw_acc": {"value": 0.5, "n": 4, "judge_acc": 0.99},
                      "ppl": {"value": {"text": 1.5}, "loss": {"text": 0.4}, "n": {"text": 100}}})
    assert "| draw_acc | 0.500 | 4 | 0.990 |" in t and "text 1.5" in t
