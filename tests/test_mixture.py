"""Weighted mixtures of shard sets (`--data NAME=DIR:WEIGHT`, train/mixture.py): the draw follows the weights,
ranks get disjoint windows, resume is exact across sets, metrics carry the per-set fields, bad input is one
line."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import torchrun_argv

from tessera.runtime.monitor import read_metrics
from tessera.tokenizers.bundle import read_bundle_spec
from tessera.tokenizers.layout import VocabLayout
from tessera.train import pretrain
from tessera.train.loader import LoaderConfig
from tessera.train.mixture import MixtureError, MixtureLoader, ShardSet, parse_data
from tessera.train.shards import write_token_shards

# The draw of each window is independent with P(set k) = share_k, so after N windows a set's share of the
# windows (and of the tokens: every window is seq_len tokens) has standard deviation sqrt(p(1-p)/N): 0.0079
# for p = 0.5 and N = 4000. TOLERANCE is over 3 of those (docs/data.md states it too).
TOLERANCE = 0.025
WEIGHTS = {"caption": 0.5, "interleaved": 0.3, "text": 0.2}
RANGES = {"caption": (10, 100), "interleaved": (100, 200), "text": (200, 300)}  # each set's own token ids
FP32 = ("--set", "dtype=fp32")


@pytest.fixture(scope="module")
def sets(tmp_path_factory, text_bundle):
    """Three shard sets, each written on its own, of one bundle: each set's documents use token ids no other set uses,
    and the sets differ in size (the smallest runs through several epochs in the tests)."""
    d = tmp_path_factory.mktemp("mixture")
    spec = read_bundle_spec(text_bundle)
    rng = np.random.default_rng(0)
    for (name, (lo, hi)), n in zip(RANGES.items(), (150, 60, 25)):
        docs = [[1, *rng.integers(lo, hi, int(rng.integers(3, 40))).tolist(), 2] for _ in range(n)]
        write_token_shards(d / name, docs, spec["layout"], spec["hash"], docs_per_shard=20)
    return d


def data_args(sets, weights=WEIGHTS):
    return [a for name, w in weights.items() for a in ("--data", f"{name}={sets / name}:{w}")]


def loader(sets, rank=0, world=1, batch_size=8, weights=WEIGHTS, text_bundle=None, seed=0):
    layout = VocabLayout.from_dict(read_bundle_spec(text_bundle)["layout"])
    shard_sets = parse_data([f"{n}={sets / n}:{w}" for n, w in weights.items()])
    return MixtureLoader(shard_sets, LoaderConfig(seq_len=32, batch_size=batch_size, seed=seed), layout, rank=rank,
                         world_size=world)


# ------------------------------------------------------------------------------------------- sampling
def test_windows_follow_the_weights_and_each_holds_one_set(sets, text_bundle):
    """500 batches of 8 windows (4000 draws): each set's share of the windows (and so of the tokens) is its
    weight within TOLERANCE; a window holds only its set's tokens; sets that run out start new epochs."""
    ld = loader(sets, text_bundle=text_bundle)
    counts = np.zeros(3)
    for _ in range(500):
        b = ld.next_batch()
        ids, set_ids = b["input_ids"].numpy(), b["set_ids"].numpy()
        counts += np.bincount(set_ids, minlength=3)
        for row, k in zip(ids, set_ids):
            lo, hi = RANGES[ld.names[k]]
            body = row[(row > 2) & (row != ld.loaders[0].layout.pad)]
            assert ((body >= lo) & (body < hi)).all()
    assert ld.names == sorted(WEIGHTS)
    shares = counts / counts.sum()
    for k, name in enumerate(ld.names):
        assert abs(shares[k] - WEIGHTS[name]) < TOLERANCE, (name, shares[k])
    epochs = {n: ld.epochs(k) for k, n in enumerate(ld.names)}
    assert all(e > 1 for e in epochs.values()), epochs  # every set went round at least once
    assert epochs["text"] > epochs["caption"]  # the smallest set, with its weight, most often
    # the same seed draws the same stream; another seed another
    again, other = loader(sets, text_bundle=text_bundle), loader(sets, text_bundle=text_bundle, seed=1)
    first = again.next_batch()
    assert torch.equal(first["input_ids"], loader(sets, text_bundle=text_bundle).next_batch()["input_ids"])
    assert not torch.equal(first["input_ids"], other.next_batch()["input_ids"])


def test_a_set_that_runs_out_starts_a_new_order(sets, text_bundle):
    """A set's epochs are new permutations of its documents: the first two epochs differ in order, each holds
    every document once."""
    ld = loader(sets, text_bundle=text_bundle)
    stream = ld.loaders[ld.names.index("text")].stream
    n = stream.drawn()[1]
    order = [stream.next(ld.loaders[0].rng) for _ in range(2 * n)]
    assert sorted(order[:n]) == sorted(order[n:]) == sorted(set(order))
    assert order[:n] != order[n:]


def test_ranks_take_disjoint_windows_of_one_global_stream(sets, text_bundle):
    """Two ranks take the windows g = rank (mod 2) of the one-process stream: together exactly its windows."""
    one = loader(sets, batch_size=4, text_bundle=text_bundle)
    two = [loader(sets, rank=r, world=2, batch_size=2, text_bundle=text_bundle) for r in range(2)]
    for _ in range(20):
        single = one.next_batch()
        b0, b1 = (ld.next_batch() for ld in two)
        for key in ("input_ids", "set_ids"):
            assert torch.equal(single[key][0::2], b0[key]) and torch.equal(single[key][1::2], b1[key])


def test_loader_state_resumes_every_set_exactly(sets, text_bundle):
    """Saved as JSON after some batches, restored into fresh loaders: the same next batches, for the same
    number of ranks, and for one rank continuing two ranks' stream."""
    two = [loader(sets, rank=r, world=2, batch_size=3, text_bundle=text_bundle) for r in range(2)]
    for _ in range(30):
        [ld.next_batch() for ld in two]
    two[0].account([5, 6, 7])
    two[1].account([5, 6, 7])
    states = json.loads(json.dumps([ld.state_dict() for ld in two]))
    expect = [[ld.next_batch() for _ in range(5)] for ld in two]
    again = [loader(sets, rank=r, world=2, batch_size=3, text_bundle=text_bundle) for r in range(2)]
    for ld, exp in zip(again, expect):
        assert ld.load_rank_states(states) is False
        assert ld.taken == [5, 6, 7]
        for e in exp:
            b = ld.next_batch()
            assert all(torch.equal(b[k], e[k]) for k in e)
    single = loader(sets, batch_size=6, text_bundle=text_bundle)
    for _ in range(30):
        single.next_batch()
    one = loader(sets, batch_size=6, text_bundle=text_bundle)
    assert one.load_rank_states(states) is True
    for _ in range(5):
        assert torch.equal(one.next_batch()["input_ids"], single.next_batch()["input_ids"])


# ------------------------------------------------------------------------------------------- training
def args(text_bundle, sets, out, *extra, weights=WEIGHTS):
    return ["--preset", "tiny", "--tokenizer", str(text_bundle), *data_args(sets, weights), "--out", str(out),
            "--set", "seq_len=32", "--set", "batch_size=4", "--set", "log_every=1", "--set", "warmup_steps=2",
            "--device", "cpu", *FP32, *extra]


def logged(run):
    """Each step's loss and per-set fields, without what measures time."""
    keep = ("step", "loss")
    return [{k: v for k, v in r.items() if k in keep or k.startswith("data/")} for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def straight(sets, text_bundle, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    assert pretrain.main(args(text_bundle, sets, run, "--max-steps", "8")) == 0
    return run


def test_metrics_carry_each_sets_weight_epochs_tokens_and_loss(sets, straight):
    recs = [r for r in read_metrics(straight) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 9))
    names = sorted(WEIGHTS)
    for r in recs:
        for n in names:
            for field in ("weight", "epochs", "tokens"):
                assert f"data/{n}/{field}" in r, (n, field)
            assert r[f"data/{n}/weight"] == pytest.approx(WEIGHTS[n])
        # tokens per set add up to the run's tokens; a set's loss is there when the step had its windows
        assert sum(r[f"data/{n}/tokens"] for n in names) == r["tokens_seen"]
        seen = [n for n in names if f"data/{n}/loss" in r]
        assert seen
        # the step's loss is the per-set losses weighted by their target tokens: between their min and max
        losses = [r[f"data/{n}/loss"] for n in seen]
        assert min(losses) - 1e-6 <= r["loss"] <= max(losses) + 1e-6
    last = recs[-1]
    # the per-set token counts are the windows drawn for each set (8 steps x 4 windows x 32 tokens)
    ld = MixtureLoader(parse_data([f"{n}={sets / n}:{w}" for n, w in WEIGHTS.items()]),
                       LoaderConfig(seq_len=32, batch_size=4), VocabLayout.from_dict(
                           json.loads((straight / "config.json").read_text())["layout"]))
    drawn = np.bincount([ld.set_of(g) for g in range(32)], minlength=3)
    assert [last[f"data/{n}/tokens"] for n in names] == [int(c) * 32 for c in drawn]
    assert all(last[f"data/{n}/epochs"] > 0 for n in names)
    cfg = json.loads((straight / "config.json").read_text())
    assert [(e["name"], e["weight"], e["dir"]) for e in cfg["data"]] == [
        (n, WEIGHTS[n], str((sets / n).resolve())) for n in names]
    assert all(len(e["fingerprint"]) == 64 for e in cfg["data"]) and len(cfg["data_fingerprint"]) == 64


def test_resume_continues_every_set_exactly(sets, text_bundle, straight, tmp_path):
    """Stopped after 4 steps and resumed (the --data in another order): the losses, the per-set losses and
    counters of every step are the straight run's, and so are the final weights and loader states."""
    from tessera.storage import load_tensors

    split = tmp_path / "split"
    assert pretrain.main(args(text_bundle, sets, split, "--set", "steps=8", "--max-steps", "4")) == 0
    reordered = dict(reversed(list(WEIGHTS.items())))
    assert pretrain.main(args(text_bundle, sets, split, "--resume", "--max-steps", "8", weights=reordered)) == 0
    assert logged(split) == logged(straight)
    a, b = load_tensors(split / "model.safetensors"), load_tensors(straight / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def state(run):
        return json.loads((run / "checkpoints/step_000008/state.json").read_text())["loaders"]

    assert state(split) == state(straight)
    assert sum(state(split)[0]["taken"].values()) == 8 * 4


def test_two_processes_under_torchrun_match_one(sets, text_bundle, tmp_path):
    """DDP over gloo: two ranks of 2 windows take the one-process stream of 4-window batches, so the same
    losses, and the same per-set tokens (reduced over ranks)."""
    one = tmp_path / "one"
    assert pretrain.main(args(text_bundle, sets, one, "--max-steps", "4")) == 0
    cmd = [*torchrun_argv(2), "-m", "tessera.train.pretrain",
           *args(text_bundle, sets, tmp_path / "two", "--max-steps", "4", "--set", "batch_size=2")]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = logged(one), logged(tmp_path / "two")
    assert len(b) == 4
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5), k


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("values, message", [
    (["a=D:0"], "the weight '0' of 'a' is not a positive number"),
    (["a=D:-1"], "is not a positive number"),
    (["a=D:lots"], "is not a positive number"),
    (["a=D:nan"], "is not a positive number"),
    (["a=D:inf"], "is not a positive number"),
    (["a=D"], "the weight is missing"),
    (["a=D:1", "a=E:2"], "names a more than once"),
    (["a=D:1", "E"], "mixes named sets and unnamed ones (E)"),
    (["D", "E"], "given 2 times without names"),
])
def test_bad_data_arguments_are_refused(values, message):
    with pytest.raises(MixtureError) as e:
        parse_data(values)
    assert message in str(e.value)


def test_data_arguments_parse():
    assert parse_data("shards/") == [ShardSet(None, Path("shards/"))]
    assert parse_data(["/x/a=b"])[0].name is None  # a path with '=' is a path
    sets = parse_data(["text=/d/t:0.10", "caption=/d/c:c:0.45"])  # sorted by name; the last ':' parts the weight
    assert [(s.name, str(s.dir), s.weight) for s in sets] == [("caption", "/d/c:c", 0.45), ("text", "/d/t", 0.1)]


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_mixtures_are_one_line_errors_before_anything_is_written(sets, text_bundle, tmp_path, capsys):
    run = tmp_path / "run"
    err = one_line_error(capsys, args(text_bundle, sets, run, weights={**WEIGHTS, "missing": 0.1}))
    assert "missing=" in err and "is not a directory" in err
    err = one_line_error(capsys, args(text_bundle, sets, run, weights={"caption": 1, "text": 0}))
    assert "not a positive number" in err
    err = one_line_error(capsys, ["--data", str(sets / "text"), *args(text_bundle, sets, run)])
    assert "mixes named sets and unnamed ones" in err
    err = one_line_error(capsys, args(text_bundle, sets, run, "--set", "mix=a=1"))
    assert "--set mix=a=1" in err
    # sets of other bundles are named, with what differs
    spec = read_bundle_spec(text_bundle)
    docs = [[1, 50, 51, 2]] * 10
    write_token_shards(tmp_path / "same_vocab", docs, spec["layout"], "0" * 64)
    other = VocabLayout(text_size=500, image_codebook_size=0, audio_codebook_size=0, audio_levels=0, max_grid=8)
    write_token_shards(tmp_path / "other_vocab", docs, other.to_dict(), "1" * 64)
    argv = args(text_bundle, sets, run) + ["--data", f"x={tmp_path / 'same_vocab'}:1",
                                           "--data", f"y={tmp_path / 'other_vocab'}:1"]
    err = one_line_error(capsys, argv)
    assert "--data sets x, y were not tokenized with --tokenizer" in err
    assert "x: bundle 000000000000, the same vocabulary layout" in err and "y: bundle 111111111111, another" in err
    assert not run.exists()


def test_resume_with_other_sets_or_weights_is_refused(sets, text_bundle, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain.main(args(text_bundle, sets, run, "--set", "steps=4", "--max-steps", "2")) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    err = one_line_error(capsys, args(text_bundle, sets, run, "--resume", weights={**WEIGHTS, "caption": 0.6}))
    assert "not the mixture" in err and "weight of caption 0.5 -> 0.6: resume with the run's --data" in err
    del_text = {k: v for k, v in WEIGHTS.items() if k != "text"}
    err = one_line_error(capsys, args(text_bundle, sets, run, "--resume", weights=del_text))
    assert "trained on: set text removed: resume" in err  # the other two keep their proportions
    swapped = ["--data", f"caption={sets / 'text'}:0.5", "--data", f"interleaved={sets / 'interleaved'}:0.3",
               "--data", f"text={sets / 'caption'}:0.2"]
    argv = args(text_bundle, sets, run, "--resume", weights={})
    err = one_line_error(capsys, argv[:4] + swapped + argv[4:])
    assert "set caption is other data" in err and "set text is other data" in err
    argv = args(text_bundle, sets, run, "--resume", weights={})
    err = one_line_error(capsys, argv[:4] + ["--data", str(sets / "text")] + argv[4:])
    assert "is one shard set, but" in err and "trained on a mixture" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    # the same mixture with weights of the same proportions is the same data
    scaled = {k: 10 * v for k, v in WEIGHTS.items()}
    assert pretrain.main(args(text_bundle, sets, run, "--resume", "--max-steps", "4", weights=scaled)) == 0


def test_a_single_set_run_refuses_a_mixture_on_resume(sets, text_bundle, tmp_path, capsys):
    run = tmp_path / "run"
    single = args(text_bundle, sets, run, "--set", "steps=4", "--max-steps", "2", weights={})
    single[4:4] = ["--data", str(sets / "caption")]
    assert pretrain.main(single) == 0
    assert json.loads((run / "config.json").read_text())["data"] == str((sets / "caption").resolve())
    err = one_line_error(capsys, args(text_bundle, sets, run, "--resume"))
    assert "is a mixture (caption, interleaved, text), but" in err and "one shard set" in err


def test_eval_finds_the_digits_corpus_of_a_mixture_run(tmp_path):
    """`tessera eval` looks for the digits corpus through config.json's data: a mixture lists its sets."""
    from tessera.eval.harness import find_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "meta.json").write_text("{}")
    for name, inputs in (("text", []), ("digits", [{"path": str(corpus / "documents.jsonl")}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"inputs": inputs}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": [{"name": n, "dir": str(tmp_path / n)}
                                                          for n in ("digits", "text")]}))
    assert find_corpus(run) == corpus
