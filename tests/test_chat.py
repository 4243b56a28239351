"""Conversations: the chat template, conversation documents (loss on the assistant only), Tessera.chat."""

import json

import numpy as np
import pytest
from PIL import Image

from tessera.model.api import random_model
from tessera.tokenizers import build_bundle, load_bundle
from tessera.tokenizers.bundle import BundleError, read_bundle_spec
from tessera.tokenizers.chat import DEFAULT_CHAT, ChatError, ChatTemplate
from tessera.train import pretokenize as pt
from tessera.train.shards import ShardReader


def test_template_renders_roles_and_puts_the_loss_on_the_assistant_only():
    turns = [("system", [("text", "be brief", True)]), ("user", [("image", "a.png", True), ("text", "what?", True)]),
             ("assistant", [("text", "seven", True), ("text", "aside", False)])]
    assert DEFAULT_CHAT.render(turns) == [
        ("text", "system:", False), ("text", "be brief", False), ("text", "user:", False), ("image", "a.png", False),
        ("text", "what?", False), ("text", "assistant:", False), ("text", "seven", True), ("text", "aside", False)]
    assert DEFAULT_CHAT.render(turns[1:2], for_reply=True)[-1] == ("text", "assistant:", False)
    assert DEFAULT_CHAT.cut_reply(" seven user: draw one") == "seven"
    assert DEFAULT_CHAT.cut_reply("seven") == "seven"
    with pytest.raises(ChatError, match="role must be one of"):
        DEFAULT_CHAT.render([("bot", [])])
    with pytest.raises(ChatError, match="may only come first"):
        DEFAULT_CHAT.render([("user", []), ("system", [])])
    with pytest.raises(ChatError, match="must differ"):
        ChatTemplate(user="A:", assistant="A:")
    with pytest.raises(ChatError, match="non-empty"):
        ChatTemplate.from_dict({"user": " "})
    with pytest.raises(ChatError, match="keys"):
        ChatTemplate.from_dict({"human": "H:"})


def test_the_bundle_carries_its_template_and_older_bundles_keep_their_hash(text_dir, tmp_path):
    spec = build_bundle(tmp_path / "b", text_dir, chat_template={"user": "Q:", "assistant": "A:", "system": "S:"})
    assert read_bundle_spec(tmp_path / "b")["chat"] == {"user": "Q:", "assistant": "A:", "system": "S:"}
    assert load_bundle(tmp_path / "b").chat == ChatTemplate(user="Q:", assistant="A:", system="S:")
    # a bundle written before templates existed: no "chat" key, its old hash still verifies, default template
    path = tmp_path / "b" / "tokenizer.json"
    old = {k: v for k, v in spec.items() if k not in ("chat", "hash")}
    from tessera.tokenizers.bundle import _bundle_hash

    old["hash"] = _bundle_hash(old)
    path.write_text(json.dumps(old))
    assert load_bundle(tmp_path / "b").chat == DEFAULT_CHAT
    with pytest.raises(BundleError, match="must differ"):
        build_bundle(tmp_path / "c", text_dir, chat_template={"user": "X", "assistant": "X"})


def test_conversation_documents_train_only_the_assistants_turns(codec_bundle, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "a.png")
    convs = [
        {"messages": [{"role": "user", "content": [{"image": "a.png"}, {"text": "what digit is this?"}]},
                      {"role": "assistant", "content": "seven"}], "source": "chat"},
        {"messages": [{"role": "user", "content": "draw a seven"},
                      {"role": "assistant", "content": [{"image": "a.png"}]}], "source": "chat"},
    ]
    bad = [{"messages": []}, {"messages": [{"role": "user", "content": "hi"}]},
           {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
           {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": 3}]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in convs + bad))
    m = pt.pretokenize(codec_bundle, [tmp_path / "c.jsonl"], tmp_path / "shards", pt.PretokenizeConfig(workers=1),
                       progress=False)
    assert m["skipped"]["counts"] == {"bad_message": len(bad)}
    tok = load_bundle(codec_bundle)
    reader = ShardReader(tmp_path / "shards")
    ids, mask = reader.doc(0)
    text = tok.text.encode
    expect = [tok.bos_id, *text("user:")]
    assert list(ids[: len(expect)]) == expect
    answer = text("seven")
    assert list(ids[-len(answer) - 1 : -1]) == answer and ids[-1] == tok.eos_id
    # the loss mask is exactly the answer and </s>
    assert list(mask) == [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1)
    ids2, mask2 = reader.doc(1)
    L = tok.layout
    start = list(ids2).index(L.boi)
    assert mask2[:start].sum() == 0 and mask2[start:].all()  # the drawn image is the only target


def test_chat_renders_the_conversation_and_answers_in_each_modality(codec_bundle):
    tok = load_bundle(codec_bundle)
    m = random_model(tok, "tiny", seed=0)
    msgs = [{"role": "user", "content": [Image.new("L", (32, 32), 200), "what digit is this?"]}]
    seen = []
    orig = m.generate

    def spy(prompt, **kw):
        seen.append(prompt)
        return orig(prompt, **kw)

    m.generate = spy
    reply = m.chat(msgs, output="text", temperature=0, max_new_tokens=6)
    assert len(reply) == 1 and isinstance(reply[0], str)
    assert seen[0][0] == "user:" and seen[0][2] == "what digit is this?" and seen[0][-1] == "assistant:"
    image = m.chat([{"role": "user", "content": "draw a seven"}], output="image", seed=0)
    assert any(isinstance(s, Image.Image) for s in image)
    with pytest.raises(TypeError, match="content must be"):
        m.chat([{"role": "user", "content": 3}])
    with pytest.raises(ChatError, match="needs 'role' and 'content'"):
        m.chat([{"content": "hi"}])
    with pytest.raises(ValueError, match="non-empty list"):
        m.chat([])


def test_the_hf_export_carries_the_bundles_template(text_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from tessera.model.hf_tokenizer import save_hf_tokenizer

    build_bundle(tmp_path / "b", text_dir, chat_template={"user": "Q:", "assistant": "A:", "system": "S:"})
    save_hf_tokenizer(tmp_path / "b", tmp_path / "hf")
    tok = load_bundle(tmp_path / "b")
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "the digit"}]}]
    prompt = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "S:be briefQ:the digitA:"
    # tokenized as a prompt (BOS first), the ids of tessera's rendering (Tessera.chat_prompt, encoded with BOS)
    turns = [("system", [("text", "be brief", True)]), ("user", [("text", "the digit", True)])]
    assert hf(prompt).input_ids == tok.encode([v for _, v, _ in tok.chat.render(turns, for_reply=True)], bos=True)
    done = msgs + [{"role": "assistant", "content": "seven"}]
    assert hf.apply_chat_template(done, tokenize=False) == "S:be briefQ:the digitA:seven"
    with pytest.raises(Exception, match="tessera's tokenizer"):
        hf.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    with pytest.raises(Exception, match="only come first"):
        hf.apply_chat_template([msgs[1], msgs[0]], tokenize=False)
