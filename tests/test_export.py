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
                          "--out", str(d / "run"), "--max-steps", "3", "--set", "seq_len=64",
                          "--set", "batch_size=2", "--set", "model.qk_norm=false", "--device", "cpu"]) == 0
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


def test_load_refuses_a_foreign_bundle(run, tmp_path, text_dir):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    shutil.rmtree(bad / "tokenizer")
    build_bundle(bad / "tokenizer", text_dir, max_grid=4)
    with pytest.raises(tessera.model.api.LoadError, match="trained with bundle"):
        tessera.load(bad)
