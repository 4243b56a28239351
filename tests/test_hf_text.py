"""An existing model's tokenizer as the text part of a bundle (`tessera tokenizer build --text-from-hf`): the
bundle, --init-from the model it came with, a short training stage, and `tessera export hf` back to
transformers. Everything is built offline: tiny byte-level BPE tokenizers trained here, tiny random models."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import hf_model, make_hf_tokenizer
from PIL import Image

import tessera
from tessera.cli import main as cli
from tessera.model.transformer import Transformer
from tessera.tokenizers import BundleError, build_bundle, load_bundle
from tessera.tokenizers.bundle import read_bundle_spec
from tessera.train import init_from, pretrain
from tessera.train.pretokenize import PretokenizeConfig, pretokenize

TEXTS = ["the digit 7 is written 7", "", " ", "  leading spaces", "a  b   c", "line one\nline two\n\n",
         "\ttabs\tand\r\nreturns", "emoji 😀🚀🎉 👍🏽 🇯🇵 ❤️", "日本語のテキストと中文文本混在", "café naïve Ångström Съешь",
         "<boi> <img:3> <pad>", "\x00\x7f\u200b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


@pytest.mark.parametrize("style", ["llama", "qwen"])
def test_a_bundle_from_a_tokenizer_folder_keeps_its_ids_and_needs_no_folder(tmp_path, style, capsys):
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    make_hf_tokenizer(src, style)
    original = AutoTokenizer.from_pretrained(src)
    assert cli(["tokenizer", "build", "--text-from-hf", str(src), "--out", str(tmp_path / "b")]) == 0
    assert "Hugging Face tokenizer" in capsys.readouterr().out
    shutil.rmtree(src)  # the bundle holds the tokenizer's files itself
    spec = read_bundle_spec(tmp_path / "b")
    tok = load_bundle(tmp_path / "b")
    L = tok.layout
    assert spec["version"] == 2 and spec["text"]["kind"] == "hf" and spec["text"]["round_trip"]
    assert L.text_size == len(original) and L.ranges["special"].offset == len(original)
    # the document delimiters: the tokenizer's own, or its EOS in both places when it has no BOS (Qwen)
    bos, eos = ("<s>", "</s>") if style == "llama" else ("<|endoftext|>", "<|endoftext|>")
    assert (spec["text"]["bos"]["token"], spec["text"]["eos"]["token"]) == (bos, eos)
    assert (tok.bos_id, tok.eos_id) == (original.convert_tokens_to_ids(bos), original.convert_tokens_to_ids(eos))
    for s in TEXTS:
        ids = tok.text.encode(s)
        assert ids == original(s, add_special_tokens=False).input_ids, s  # the model's ids, unchanged
        assert tok.decode(tok.encode([s], bos=True, eos=True), strict=True) == ([s] if s else [])
    assert tok.encode([bos]) == [tok.bos_id]  # text spelling a special token is that token, as in transformers

    # tampering with the copied tokenizer is detected, like a codec's
    p = tmp_path / "b" / "text" / "tokenizer.json"
    p.write_text(p.read_text().replace('"the"', '"teh"'))
    with pytest.raises(BundleError, match="text tokenizer .* does not match its recorded hash"):
        load_bundle(tmp_path / "b")


def test_sentencepiece_bundles_stay_version_1_and_build_refusals(tmp_path, text_dir, hf_text_dir, capsys):
    spec = build_bundle(tmp_path / "sp", text_dir)
    assert spec["version"] == 1 and set(spec["text"]) == {"path", "sha256"}  # as before: the same hash
    assert load_bundle(tmp_path / "sp").text.kind == "sentencepiece"
    spec = build_bundle(tmp_path / "eos", text_from_hf=hf_text_dir, bos="</s>", eos="<s>")
    tok = load_bundle(tmp_path / "eos")
    assert (tok.bos_id, tok.eos_id) == (2, 1) and spec["text"]["bos"] == {"token": "</s>", "id": 2}
    with pytest.raises(BundleError, match="give one text tokenizer"):
        build_bundle(tmp_path / "x", text_dir, text_from_hf=hf_text_dir)
    with pytest.raises(BundleError, match="--bos and --eos choose the delimiters of a --text-from-hf"):
        build_bundle(tmp_path / "x", text_dir, eos="</s>")
    with pytest.raises(BundleError, match="the eos token '<nope>' is not in the tokenizer's vocabulary"):
        build_bundle(tmp_path / "x", text_from_hf=hf_text_dir, eos="<nope>")
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer.model").write_bytes(b"")
    assert cli(["tokenizer", "build", "--text-from-hf", str(tmp_path / "slow"), "--out", str(tmp_path / "x")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --text and --text-from-hf are exclusive
        cli(["tokenizer", "build", "--text", str(text_dir), "--text-from-hf", str(hf_text_dir), "--out", "x"])


def test_an_exported_name_the_original_tokenizer_has_is_renamed(tmp_path, hf_text_dir):
    from tokenizers import Tokenizer

    from tessera.model.hf_tokenizer import save_hf_tokenizer

    shutil.copytree(hf_text_dir, tmp_path / "src")
    t = Tokenizer.from_file(str(tmp_path / "src" / "tokenizer.json"))
    t.add_special_tokens(["<pad>"])
    t.save(str(tmp_path / "src" / "tokenizer.json"))
    build_bundle(tmp_path / "b", text_from_hf=tmp_path / "src")
    L = load_bundle(tmp_path / "b").layout
    save_hf_tokenizer(tmp_path / "b", tmp_path / "out")
    from transformers import AutoTokenizer

    exp = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert exp.convert_ids_to_tokens([L.text_size - 1, L.pad, L.boi]) == ["<pad>", "<tessera:pad>", "<boi>"]
    assert exp.pad_token_id == L.pad


def test_the_constrained_decoder_keeps_an_eos_that_is_also_the_bos(hf_text_dir):
    from tessera.model.constrained import SpanFSM
    from tessera.tokenizers import VocabLayout

    L = VocabLayout(text_size=400)
    fsm = SpanFSM(L, eos_id=2, bos_id=1)
    assert not fsm.rows[fsm.R_TEXT][1] and fsm.rows[fsm.R_TEXT][2]
    fsm = SpanFSM(L, eos_id=383, bos_id=383)  # Qwen: documents are <|endoftext|> ... <|endoftext|>
    assert fsm.rows[fsm.R_TEXT][383] and fsm.rows[fsm.R_TEXT][1]


# ------------------------------------------------------------------------------------------------ --init-from
def imported(path, bundle, **train):
    tcfg = pretrain.TrainConfig(**train)
    return init_from.plan(path, read_bundle_spec(bundle), tcfg, None, [])[1]


def test_init_from_accepts_the_models_own_tokenizer_and_refuses_another_saying_what_differs(tmp_path):
    model = tmp_path / "model"
    make_hf_tokenizer(model, "llama")
    n = build_bundle(tmp_path / "own", text_from_hf=model)["text"]["vocab_size"]
    hf_model("llama", model, n)
    assert imported(model, tmp_path / "own")["rows"] == [[0, 0, n]]
    # the same number of ids, other tokens at them (Qwen-style: its specials at the end, not at 0..2)
    make_hf_tokenizer(tmp_path / "other", "qwen")
    build_bundle(tmp_path / "same_size", text_from_hf=tmp_path / "other")
    assert read_bundle_spec(tmp_path / "same_size")["text"]["vocab_size"] == n
    with pytest.raises(init_from.InitFromError, match=f"both have {n} ids, but not the same tokens at them"):
        imported(model, tmp_path / "same_size")
    assert imported(model, tmp_path / "same_size", init_allow_vocab_mismatch=True)["rows"] == [[0, 0, n]]
    # another number of ids
    make_hf_tokenizer(tmp_path / "small", "llama", vocab_size=330)
    build_bundle(tmp_path / "smaller", text_from_hf=tmp_path / "small")
    with pytest.raises(init_from.InitFromError, match=f"tokenizer .* has {n} ids, but the bundle's text tokenizer "
                                                      f"has 330.*--text-from-hf {model}"):
        imported(model, tmp_path / "smaller")
    # without a tokenizer in the model folder only the sizes can be compared
    (model / "tokenizer.json").unlink()
    assert imported(model, tmp_path / "own")["rows"] == [[0, 0, n]]
    with pytest.raises(init_from.InitFromError, match=f"has {n} ids and the bundle's text tokenizer 330, and the "
                                                      f"folder has no tokenizer.json"):
        imported(model, tmp_path / "smaller")


# ----------------------------------------------------------------------------- the whole path, LLM to LLM
@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfdocs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / "a.png")
    sf.write(d / "a.wav", (0.3 * np.sin(np.arange(4000) / 5)).astype(np.float32), 16000)
    words = ["the", "digit", "seven", "eight", "is", "written", "café", "日本語", "😀"]
    lines = []
    for i in range(40):
        text = " ".join(words[j] for j in rng.integers(0, len(words), rng.integers(3, 15)))
        segs = [{"text": text}]
        if i % 4 == 1:
            segs = [{"text": "a drawing of", "loss": False}, {"image": "a.png"}]
        elif i % 4 == 3:
            segs = [{"audio": "a.wav"}, {"text": " seven"}]
        lines.append(json.dumps({"segments": segs}))
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return d


def run_args(bundle, shards, out, *extra):
    return ["--tokenizer", str(bundle), "--data", str(shards), "--out", str(out), "--set", "seq_len=128",
            "--set", "batch_size=2", "--set", "log_every=1", "--set", "warmup_steps=2", "--set", "dtype=fp32",
            "--device", "cpu", *extra]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_an_llm_and_its_tokenizer_gain_codes_train_and_export_to_transformers(kind, codec_bundle, docs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "hf"
    original = make_hf_tokenizer(src, "llama" if kind == "llama" else "qwen")
    n = len(original)
    rows = n + 14 if kind == "qwen3" else n  # Qwen pads its embedding table past its tokenizer's ids
    hf = hf_model(kind, src, rows, tie=kind == "qwen3")
    text_only, bundle = tmp_path / "text_bundle", tmp_path / "bundle"
    assert cli(["tokenizer", "build", "--text-from-hf", str(src), "--out", str(text_only)]) == 0
    assert cli(["tokenizer", "build", "--text-from-hf", str(src), "--image", str(codec_bundle / "image"), "--audio",
                str(codec_bundle / "audio"), "--audio-levels", "2", "--max-grid", "16", "--out", str(bundle)]) == 0
    tok = load_bundle(bundle)
    L = tok.layout
    assert L.text_size == n and L.has_image and L.has_audio
    text = torch.tensor([tok.encode(["the digit seven is written 7 😀"], bos=True)])

    # step 0: on text, the imported model's logits over the model's own ids are the model's
    record = imported(src, text_only)
    assert record["rows"] == [[0, 0, n]] and record["source_vocab"] == rows  # ids 1:1, Qwen's padding dropped
    tcfg = pretrain.TrainConfig()
    mcfg, record = init_from.plan(src, read_bundle_spec(text_only), tcfg, None, [])
    model = Transformer(mcfg)
    model.init_weights(seed=0)
    init_from.initialize(model, record, text_only, tcfg)
    with torch.no_grad():
        want = hf(text).logits[..., :n]
        assert (model.eval()(text)[..., :n] - want).abs().max() <= 1e-5

    # the vocabulary extended with image and audio codes (a run of pretrain, 0 steps): the same text logits
    man = pretokenize(bundle, [docs / "docs.jsonl"], tmp_path / "shards", PretokenizeConfig(workers=1, device="cpu"),
                      progress=False)
    assert man["tokens"]["image"] > 0 and man["tokens"]["audio"] > 0
    start = tmp_path / "start"
    assert pretrain.main(run_args(bundle, tmp_path / "shards", start, "--init-from", str(src), "--max-steps", "0")) == 0
    assert json.loads((start / "config.json").read_text())["init_from"]["rows"] == [[0, 0, n]]
    m = tessera.load(start, device="cpu", dtype=torch.float32)
    assert m.model.cfg.vocab_size == L.padded_vocab_size > model.cfg.vocab_size
    with torch.no_grad():
        assert (m.model(text)[..., :n] - want).abs().max() <= 1e-5

    # a short stage on shards of this bundle: text, an image and audio in the vocabulary
    run = tmp_path / "run"
    assert pretrain.main(run_args(bundle, tmp_path / "shards", run, "--init-from", str(src), "--max-steps", "4")) == 0

    # export: an ordinary transformers model and tokenizer, read from local files only
    assert cli(["export", "hf", "--model", str(run), "--out", str(tmp_path / "export")]) == 0
    exp_model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    exp_tok = AutoTokenizer.from_pretrained(tmp_path / "export", local_files_only=True)
    assert type(exp_model).__name__ == ("LlamaForCausalLM" if kind == "llama" else "Qwen3ForCausalLM")
    assert exp_model.config.vocab_size == L.padded_vocab_size and len(exp_tok) == L.padded_vocab_size
    m = tessera.load(run, device="cpu", dtype=torch.float32)
    image = tok.image_span(np.arange(4).reshape(2, 2))
    mixed = torch.tensor([tok.encode(["a drawing of"], bos=True) + image + tok.text.encode(" seven")])
    with torch.no_grad():
        for ids in (text, mixed):
            assert (m.model(ids) - exp_model(ids).logits).abs().max() <= 1e-4

    # text: the bundle's ids (which are the original tokenizer's), <s> (or Qwen's <|endoftext|>) first
    for s in TEXTS:
        ids = tok.text.encode(s)
        assert exp_tok.decode(ids) == s
        if "<boi>" in s:  # the one difference: transformers reads added tokens' names in text, tessera does not
            assert exp_tok(s, add_special_tokens=False).input_ids[0] == L.boi and ids[0] != L.boi
            continue
        assert exp_tok(s, add_special_tokens=False).input_ids == ids == original(s, add_special_tokens=False).input_ids
        assert exp_tok(s).input_ids == tok.encode([s], bos=True), s
    assert (exp_tok.bos_token_id, exp_tok.eos_token_id, exp_tok.pad_token_id) == (tok.bos_id, tok.eos_id, L.pad)
    # codes: added tokens at the bundle's ids, round-tripping through their strings
    codes = [L.boi, L.h_token(2), L.w_token(3), L.image_id(5), L.eoi, L.boa, L.audio_id(0, 7), L.audio_id(1, 3),
             L.eoa, L.reserved_offset]
    names = ["<boi>", "<h:2>", "<w:3>", "<img:5>", "<eoi>", "<boa>", "<aud0:7>", "<aud1:3>", "<eoa>", "<reserved:0>"]
    assert exp_tok.convert_ids_to_tokens(codes) == names and exp_tok.convert_tokens_to_ids(names) == codes
    seq = tok.text.encode("look: ") + codes + tok.text.encode(" seven")
    assert exp_tok.decode(seq) == "look: " + "".join(names) + " seven"
    assert exp_tok(exp_tok.decode(seq), add_special_tokens=False).input_ids == seq
    assert exp_tok.decode(seq, skip_special_tokens=True) == "look:  seven"
    # the bundle's chat template (the one Tessera.chat renders) replaces the original's (Qwen's <|im_start|>)
    assert exp_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True) == "user:hiassistant:"

    # transformers users decode text from generated ids: greedy text as tessera's output="text"
    suppress = ([] if tok.bos_id == tok.eos_id else [tok.bos_id]) + list(range(L.boi, L.padded_vocab_size))
    for prompt in ["the digit", " seven"]:
        enc = exp_tok(prompt, return_tensors="pt")
        out = exp_model.generate(**enc, do_sample=False, max_new_tokens=8, min_new_tokens=1, suppress_tokens=suppress)
        new = out[0, enc.input_ids.shape[1]:].tolist()
        want = m.generate_ids(prompt, output="text", temperature=0, max_new_tokens=8)[0]
        assert new == want
        assert exp_tok.decode(new, skip_special_tokens=True) == "".join(
            m.generate(prompt, output="text", temperature=0, max_new_tokens=8))
