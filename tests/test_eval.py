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


def test_speech_to_image_documents_carry_the_transcript_and_tasks_follow_the_corpus(corpus):
    docs = [json.loads(line) for line in (corpus / "documents.jsonl").read_text().splitlines()]
    s2i = [d for d in docs if d["source"] == "speech_to_image"]
    assert s2i and all([next(iter(s)) for s in d["segments"]] == ["audio", "text", "image"] for d in s2i)
    assert all(digit_in_text(d["segments"][1]["text"]) == d["label"] for d in s2i)
    vias = {i.via for i in digits_tasks(corpus) if i.task == "speech_to_image_acc"}
    assert vias == {"text"}  # auto: as the corpus's documents are built
    from tessera.eval.tasks import DigitsEvalConfig

    direct = digits_tasks(corpus, DigitsEvalConfig(speech_to_image_via="direct"))
    assert {i.via for i in direct if i.task == "speech_to_image_acc"} == {None}
    assert all(i.via is None for i in direct + digits_tasks(corpus) if i.task != "speech_to_image_acc")
    with pytest.raises(TaskError, match="via must be"):
        TaskItem.from_dict({"task": "x", "prompt": [], "label": 1, "judge": "image_digit", "output": "image",
                            "via": "audio"})
    with pytest.raises(TaskError, match="needs an image or audio output"):
        TaskItem.from_dict({"task": "x", "prompt": [], "label": 1, "judge": "text_digit", "via": "text"})
    with pytest.raises(TaskError, match="speech_to_image_via"):
        DigitsEvalConfig(speech_to_image_via="both")


def test_a_via_text_item_draws_after_the_models_own_words(tmp_path):
    """The harness asks for the text first (greedy, any modality allowed), stops it at the first span, and
    draws with that text appended to the prompt; the judged output is the drawing."""
    from PIL import Image

    from tessera.eval.harness import run_tasks

    calls = []

    class Model:
        def generate(self, prompts, output, **kw):
            calls.append((output, [list(p) for p in prompts], kw))
            if output == "any":  # words, then a span the harness must drop, then words after it
                return [[" someone says", " seven", Image.new("L", (8, 8)), "tail"], [Image.new("L", (8, 8))]]
            return [[Image.new("L", (8, 8), 255)] for _ in prompts]

    class Judge:
        corpus = None

        def verdicts(self, name, outs, labels):
            return [isinstance(o[-1], Image.Image) for o in outs]

        def heldout_accuracy(self, name):
            return None

    items = [TaskItem("s2i", [{"text": "hello"}], "image", 7, "image_digit", {"seed": 3}, via="text"),
             TaskItem("s2i", [{"text": "hi"}], "image", 2, "image_digit", {"seed": 4}, via="text")]
    res = run_tasks(Model(), items, tmp_path, Judge(), progress=False, save_dir=None)
    assert res["s2i"]["value"] == 1.0
    (o1, p1, kw1), (o2, p2, kw2) = calls
    assert o1 == "any" and kw1["temperature"] == 0 and p1 == [["hello"], ["hi"]]
    assert o2 == "image" and p2 == [["hello", "someone says seven"], ["hi"]] and kw2["seed"] == [3, 4]


def test_chat_mode_asks_each_task_as_a_users_turn(tmp_path, fixture_tokenizer):
    from tessera.eval.harness import run_tasks
    from tessera.model.api import random_model

    m = random_model(fixture_tokenizer, "tiny", seed=0)
    prompts = []
    orig = m.generate
    m.generate = lambda p, **kw: prompts.append(p) or orig(p, **kw)

    class Judge:
        corpus = None

        def verdicts(self, name, outs, labels):
            return [bool(o) for o in outs]

        def heldout_accuracy(self, name):
            return None

    items = [TaskItem("t", [{"text": "say hi"}], "text", 1, "text_digit", {"temperature": 0, "max_new_tokens": 3})]
    run_tasks(m, items, tmp_path, Judge(), progress=False, chat=True)
    assert prompts == [[["user:", "say hi", "assistant:"]]]


def test_corpus_writes_its_pairings_as_conversations(corpus):
    docs = [json.loads(line) for line in (corpus / "documents.jsonl").read_text().splitlines()]
    convs = [json.loads(line) for line in (corpus / "conversations.jsonl").read_text().splitlines()]
    assert len(convs) == sum(d["source"] != "text" for d in docs) > 0
    assert (corpus / "test_conversations.jsonl").stat().st_size > 0
    for c in convs:
        user, assistant = c["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        if c["source"] == "caption":
            assert "image" in user["content"][0] and digit_in_text(assistant["content"][0]["text"]) == c["label"]
        if c["source"] == "draw":
            assert list(assistant["content"][0]) == ["image"]
