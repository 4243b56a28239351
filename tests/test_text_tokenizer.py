import random
import time

import pytest

from tessera.unimodal.text import TextTokenizer, TextTokenizerError, TextTrainConfig, train_text_tokenizer


def test_training_is_deterministic(tmp_path):
    corpus = tmp_path / "c.txt"
    rng = random.Random(0)
    words = ["seven", "eight", "digit", "drawing", "日本", "число", "🚀", "what", "is", "this"]
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)), "utf-8")
    cfg = TextTrainConfig(vocab_size=320, seed=3)
    a = train_text_tokenizer([corpus], tmp_path / "a", cfg, progress=False)
    b = train_text_tokenizer([corpus], tmp_path / "b", cfg, progress=False)
    assert a.serialized() == b.serialized()
    assert (tmp_path / "a" / "spm.model").read_bytes() == (tmp_path / "b" / "spm.model").read_bytes()


def test_round_trip_of_unseen_scripts(text_dir):
    tok = TextTokenizer.load(text_dir)
    for s in ["  two  spaces\n", "ünïcödé 🧪 ∑ 𝔘𝔫𝔦", "\x00\x7f", "한국어 텍스트", " leading", "trailing ", "\r\n"]:
        assert tok.decode(tok.encode(s)) == s


def test_empty_and_unreadable_inputs_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TextTokenizerError, match="empty"):
        train_text_tokenizer([empty], tmp_path / "o", progress=False)
    with pytest.raises(TextTokenizerError, match="does not exist"):
        train_text_tokenizer([tmp_path / "nope.txt"], tmp_path / "o", progress=False)
    with pytest.raises(TextTokenizerError, match="is a directory"):
        train_text_tokenizer([tmp_path], tmp_path / "o", progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n\n\xff\xfe\n")
    with pytest.raises(TextTokenizerError, match="no usable text"):
        train_text_tokenizer([blank], tmp_path / "o", progress=False)
    with pytest.raises(TextTokenizerError, match="too small"):
        train_text_tokenizer([blank], tmp_path / "o", TextTrainConfig(vocab_size=100), progress=False)


def test_vocab_too_large_for_input_is_clear(tmp_path):
    small = tmp_path / "s.txt"
    small.write_text("abc abc abc\n")
    with pytest.raises(TextTokenizerError, match="vocab"):
        train_text_tokenizer([small], tmp_path / "o", TextTrainConfig(vocab_size=5000), progress=False)


def test_long_lines_are_cut_not_dropped(tmp_path):
    f = tmp_path / "long.txt"
    f.write_text(("onelonglinewithoutbreaks " * 2000) + "\n")  # 50 kB, beyond sentencepiece's limit
    tok = train_text_tokenizer([f], tmp_path / "o", TextTrainConfig(vocab_size=320), progress=False)
    ids = tok.encode("onelonglinewithoutbreaks")
    assert len(ids) < 10  # merges were learned from the cut pieces


@pytest.mark.slow
def test_one_megabyte_mixed_script_trains_under_30s(tmp_path):
    rng = random.Random(0)
    scripts = [range(0x61, 0x7B), range(0x430, 0x450), range(0x3B1, 0x3CA), range(0x4E00, 0x4E00 + 800),
               range(0x627, 0x64A), range(0x905, 0x939)]
    lines, size = [], 0
    while size < 1_000_000:
        line = " ".join("".join(chr(rng.choice(rng.choice(scripts))) for _ in range(rng.randint(1, 8)))
                        for _ in range(rng.randint(5, 20)))
        lines.append(line)
        size += len(line.encode()) + 1
    f = tmp_path / "mixed.txt"
    f.write_text("\n".join(lines) + "\n", "utf-8")
    t = time.perf_counter()
    tok = train_text_tokenizer([f], tmp_path / "o", TextTrainConfig(vocab_size=8000), progress=False)
    elapsed = time.perf_counter() - t
    assert elapsed < 30, elapsed
    assert tok.decode(tok.encode(lines[0])) == lines[0]
