"""`tessera export hf` and `tessera.load` on a real (briefly trained) run."""

import json

import pytest
import torch

import tessera
from tessera.cli import main as cli
from tessera.tokenizers import build_bundle, load_bundle
from tessera.train import pretrain
from tessera.train.pretokenize import PretokenizeConfig, pretokenize


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_dir):
    d = tmp_path_factory.mktemp("exp")
    with open(d / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"segments": [{"text": f"the digit {i % 10} is written {i % 10}"}]}) + "\n")
    build_bundle(d / "bundle", text_dir)
    pretokenize(d / "bundle", [d / "docs.jsonl"], d / "shards", PretokenizeConfig(workers=1), progress=False)
    assert pretrain.main(["--preset", "tiny", "--tokenizer", str(d / "bundle"), "--data", str(d / "shards"),
                          "--out", str(d / "run"), "--max-steps", "100", "--set", "warmup_steps=10",
                          "--set", "seq_len=64", "--set", "batch_size=2", "--set", "model.qk_norm=false",
                          "--device", "cpu"]) == 0  # ~1 s: enough steps to write text, not random byte pieces
    return d / "run"


def test_load_and_generate(run):
    m = tessera.load(run)
    assert isinstance(m.generate("the digit", output="text", max_new_tokens=5, seed=0)[0], str)


def test_export_loads_in_transformers_with_the_same_logits(run, tmp_path):
    from transformers import AutoModelForCausalLM

    assert cli(["export", "hf", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = load_bundle(tmp_path / "hf" / "tessera_tokenizer")
    m = tessera.load(run)
    ids = torch.tensor([tok.encode(["the digit 7"], bos=True)])
    with torch.no_grad():
        assert (m.model(ids) - hf(ids).logits).abs().max() <= 1e-4
    assert cli(["export", "hf", "--model", str(run), "--out", str(tmp_path / "hf")]) == 2  # exists: needs --force


# Strings whose tessera text ids the exported transformers tokenizer must reproduce, and decode back.
TEXTS = [
    "the digit 7 is written 7", "", " ", "  leading spaces", "trailing spaces  ", "a  b   c", "1234567890",
    "line one\nline two\n\n", "\ttabs\tand\r\nreturns", "emoji 😀🚀🎉 👍🏽 🇯🇵 ❤️",
    "日本語のテキストと中文文本混在", "café naïve Ångström Ελληνικά Съешь", "<boi> <s> </s> <img:3> <pad>",
    "\x00\x7f\u200b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def test_export_writes_a_transformers_tokenizer_with_tesseras_ids(run, tmp_path):
    from transformers import AutoTokenizer

    assert cli(["export", "hf", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = load_bundle(run / "tokenizer")
    L = tok.layout
    assert len(hf_tok) == L.padded_vocab_size
    for s in TEXTS:
        ids = tok.text.encode(s)
        assert hf_tok(s, add_special_tokens=False).input_ids == ids, s
        assert hf_tok(s).input_ids == tok.encode([s], bos=True), s  # <s> first, as tessera prompts
        assert hf_tok.decode(ids) == s
    assert hf_tok.decode([tok.text.unk_id]) == tok.text.decode([tok.text.unk_id])  # " ⁇ ", as SentencePiece
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert hf_tok.pad_token_id == tok.pad_id
    names = hf_tok.convert_ids_to_tokens([L.boi, L.eoa, L.h_token(3), L.padded_vocab_size - 1])
    assert names == ["<boi>", "<eoa>", "<h:3>", f"<unused:{L.padded_vocab_size - L.vocab_size - 1}>"]


def test_exported_tokenizer_names_code_tokens_at_their_ids(text_dir, tmp_path):
    from transformers import AutoTokenizer

    from tessera.model.hf_tokenizer import hf_tokenizer
    from tessera.tokenizers import VocabLayout
    from tessera.unimodal.text import TextTokenizer

    text = TextTokenizer.load(text_dir)
    L = VocabLayout(text.vocab_size, image_codebook_size=32, audio_codebook_size=16, audio_levels=2,
                    max_grid=4, n_reserved=2)
    hf_tokenizer(L, text).save_pretrained(tmp_path / "tok")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(hf_tok) == L.padded_vocab_size
    ids = [L.image_id(31), L.audio_id(0, 5), L.audio_id(1, 15), L.reserved_offset + 1]
    assert hf_tok.convert_ids_to_tokens(ids) == ["<img:31>", "<aud0:5>", "<aud1:15>", "<reserved:1>"]
    assert hf_tok.convert_tokens_to_ids("<img:31>") == L.image_id(31)
    assert hf_tok("<img:31>", add_special_tokens=False).input_ids == text.encode("<img:31>")  # stays text
    assert hf_tok.decode(ids + text.encode(" seven"), skip_special_tokens=True) == " seven"


def test_transformers_greedy_text_generation_matches_tessera(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli(["export", "hf", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    m = tessera.load(run, device="cpu", dtype=torch.float32)
    # Text-only output, as tessera's output="text": no <s> and no id past the text range.
    text_only = [hf_tok.bos_token_id, *range(hf_tok.convert_tokens_to_ids("<boi>"), len(hf_tok))]
    for prompt in ["the digit", "the digit 3 is written", " 9"]:
        want = "".join(m.generate(prompt, output="text", temperature=0, max_new_tokens=12))
        enc = hf_tok(prompt, return_tensors="pt")
        out = hf.generate(**enc, do_sample=False, max_new_tokens=12, suppress_tokens=text_only)
        new = out[0, enc.input_ids.shape[1]:]
        assert new.tolist() == m.generate_ids(prompt, output="text", temperature=0, max_new_tokens=12)[0]
        assert hf_tok.decode(new, skip_special_tokens=True) == want, prompt


def test_load_refuses_a_foreign_bundle(run, tmp_path, text_dir):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    shutil.rmtree(bad / "tokenizer")
    build_bundle(bad / "tokenizer", text_dir, max_grid=4)
    with pytest.raises(tessera.model.api.LoadError, match="trained with bundle"):
        tessera.load(bad)
