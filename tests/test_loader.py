"""Packing, masks, mixture, conditioning dropout, determinism and resume of the pretraining loader."""

import numpy as np
import pytest
import torch

from tessera.tokenizers.layout import VocabLayout
from tessera.train.loader import IGNORE, LoaderConfig, PackedLoader, Permutation, parse_mix
from tessera.train.shards import ShardReader, write_token_shards

L = VocabLayout(text_size=100, image_codebook_size=16, audio_codebook_size=8, audio_levels=2, max_grid=8, n_reserved=4)
BOS, EOS = 1, 2


def image(h=2, w=2, c=3):
    return [L.boi, L.h_token(h), L.w_token(w)] + [L.image_id(c)] * (h * w) + [L.eoi]


def audio(frames=3):
    return [L.boa] + [L.audio_id(q, 1) for _ in range(frames) for q in range(2)] + [L.eoa]


def make(tmp_path, docs, masks=None, sources=None, name="s"):
    write_token_shards(tmp_path / name, docs, L.to_dict(), "hash", masks=masks, sources=sources, docs_per_shard=7)
    return ShardReader(tmp_path / name)


def rng_docs(n, seed=0):
    r = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        body = list(r.integers(3, 100, r.integers(1, 12)))
        if r.random() < 0.5:
            body += image()
        if r.random() < 0.3:
            body = audio(int(r.integers(1, 4))) + body
        docs.append([BOS] + body + [EOS])
    return docs


def test_permutation_is_a_bijection():
    for n in (1, 2, 7, 1000, 4097):
        p = Permutation(n, key=3)
        assert sorted(p(i) for i in range(n)) == list(range(n))
    assert [Permutation(100, 1)(i) for i in range(5)] != [Permutation(100, 2)(i) for i in range(5)]


def test_windows_hold_whole_documents_and_mask_boundaries(tmp_path):
    docs = rng_docs(60)
    reader = make(tmp_path, docs)
    ld = PackedLoader(reader, LoaderConfig(seq_len=48, batch_size=4, seed=0), L)
    seen = set()
    for _ in range(10):
        b = ld.next_batch()
        ids, tg, pos, doc = (b[k].numpy() for k in ("input_ids", "targets", "positions", "doc_ids"))
        for r in range(ids.shape[0]):
            for d in np.unique(doc[r]):
                sel = np.nonzero(doc[r] == d)[0]
                assert (np.diff(sel) == 1).all()  # a piece is contiguous
                assert (pos[r, sel] == np.arange(len(sel))).all()  # positions restart at 0
                toks = ids[r, sel]
                if toks[0] == BOS:
                    seen.add(tuple(toks))
            # a target never crosses into the next piece
            cross = np.nonzero(doc[r, 1:] != doc[r, :-1])[0]
            assert (tg[r, cross] == IGNORE).all()
            # padding never produces a target
            assert (tg[r][ids[r] == L.pad] == IGNORE).all()
    # documents arrive intact (a window's last token is a target only, so a piece may end one token early)
    full = {tuple(d) for d in docs}
    assert seen and all(any(s == f[: len(s)] for f in full) for s in seen)


def test_loss_mask_zeroes_exactly_the_masked_tokens(tmp_path):
    docs = [[BOS, 10, 11, 12] + image() + [13, EOS]] * 5
    masks = [[0, 0, 0, 0] + [1] * len(image()) + [0, 1]] * 5
    ld = PackedLoader(make(tmp_path, docs, masks), LoaderConfig(seq_len=16, batch_size=1), L, sequential=True)
    b = ld.next_batch()
    ids, tg = b["input_ids"][0].numpy(), b["targets"][0].numpy()
    n = len(docs[0])
    expect = [docs[0][i + 1] if masks[0][i + 1] else IGNORE for i in range(n - 1)]
    assert list(tg[: n - 1]) == expect
    from tessera.train.losses import token_losses

    logits = torch.randn(1, 16, L.padded_vocab_size, requires_grad=True)
    r = token_losses(logits, b["targets"], torch.as_tensor(L.modality_table()))
    r["ce"].backward()
    has_grad = logits.grad[0].abs().sum(-1) > 0
    assert torch.equal(has_grad, torch.as_tensor(tg != IGNORE))
    assert int(r["count"]) == int((tg != IGNORE).sum())
    assert r["n_mod"].tolist() == [1, len(image()), 0]  # </s> counts as text; the image span as image


def test_long_documents_split_outside_image_spans(tmp_path):
    body = []
    for _ in range(6):
        body += [5, 6, 7] + image(3, 3) + audio(4)
    docs = [[BOS] + body + [EOS]] * 3
    ld = PackedLoader(make(tmp_path, docs), LoaderConfig(seq_len=30, batch_size=1, lookahead=1), L, sequential=True)
    pieces = []
    for b in ld:
        ids, doc = b["input_ids"][0].numpy(), b["doc_ids"][0].numpy()
        for d in np.unique(doc):
            t = ids[doc == d]
            if (t == L.pad).all():
                continue
            pieces.append(t)
            # every image span inside a piece is complete
            opens, closes = np.nonzero(t == L.boi)[0], np.nonzero(t == L.eoi)[0]
            assert len(opens) == len(closes) and (closes - opens == 3 + 9).all()
    assert ld.stats["split_docs"] == 3 and len(pieces) > 3


def test_an_image_span_longer_than_a_window_is_dropped_and_counted(tmp_path):
    docs = [[BOS] + image(6, 6) + [EOS], [BOS, 5, 6, EOS]]
    ld = PackedLoader(make(tmp_path, docs), LoaderConfig(seq_len=20, batch_size=1), L, sequential=True)
    batches = list(ld)
    assert ld.stats["dropped_long_span"] == 1 and len(batches) == 1


def test_mixture_weights(tmp_path):
    docs = [[BOS, 3, EOS]] * 50 + [[BOS, 4, 4, EOS]] * 50
    sources = ["a"] * 50 + ["b"] * 50
    reader = make(tmp_path, docs, sources=sources)
    ld = PackedLoader(reader, LoaderConfig(seq_len=63, batch_size=8, mix=parse_mix("a=3,b=1")), L)
    ids = torch.cat([ld.next_batch()["input_ids"] for _ in range(10)]).numpy()
    a, b = (ids == 3).sum(), (ids == 4).sum() / 2
    assert 2.4 < a / b < 3.7, a / b
    with pytest.raises(Exception, match="unknown source"):
        PackedLoader(reader, LoaderConfig(mix={"c": 1.0}), L)


def test_conditioning_dropout_removes_the_prompt(tmp_path):
    docs = [[BOS, 10, 11, 12] + image() + [EOS]] * 20 + [[BOS] + image() + [10, EOS]] * 20
    ld = PackedLoader(make(tmp_path, docs), LoaderConfig(seq_len=63, batch_size=4, cond_dropout=0.5, seed=3), L)
    ids = torch.cat([ld.next_batch()["input_ids"] for _ in range(10)]).numpy()
    dropped = sum(1 for r in ids for i in range(len(r) - 1) if r[i] == BOS and r[i + 1] == L.boi)
    assert ld.stats["cond_dropped"] > 10 and dropped >= ld.stats["cond_dropped"]
    # captions (the span is first) are never touched: 10 always follows <eoi> in them
    ld0 = PackedLoader(make(tmp_path, docs[20:], name="t"), LoaderConfig(seq_len=63, cond_dropout=1.0), L)
    ld0.next_batch()
    assert ld0.stats["cond_dropped"] == 0


def test_deterministic_and_resumable(tmp_path):
    reader = make(tmp_path, rng_docs(200))
    cfg = LoaderConfig(seq_len=40, batch_size=3, seed=5, cond_dropout=0.2)
    a = PackedLoader(reader, cfg, L)
    first = [a.next_batch() for _ in range(6)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(6)]
    b = PackedLoader(reader, cfg, L)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, [b.next_batch() for _ in range(6)]))
    c = PackedLoader(reader, cfg, L)
    import json

    c.load_state_dict(json.loads(json.dumps(state)))
    again = [c.next_batch() for _ in range(6)]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(rest, again) for k in x)
    other = PackedLoader(reader, LoaderConfig(seq_len=40, batch_size=3, seed=6), L)
    assert not torch.equal(other.next_batch()["input_ids"], first[0]["input_ids"])


def test_ranks_split_the_global_stream(tmp_path):
    reader = make(tmp_path, rng_docs(100))
    one = PackedLoader(reader, LoaderConfig(seq_len=32, batch_size=4, seed=1), L)
    r0 = PackedLoader(reader, LoaderConfig(seq_len=32, batch_size=2, seed=1), L, rank=0, world_size=2)
    r1 = PackedLoader(reader, LoaderConfig(seq_len=32, batch_size=2, seed=1), L, rank=1, world_size=2)
    for _ in range(3):
        g, a, b = one.next_batch()["input_ids"], r0.next_batch()["input_ids"], r1.next_batch()["input_ids"]
        assert torch.equal(g[0::2], a) and torch.equal(g[1::2], b)


def test_epochs_visit_every_document(tmp_path):
    docs = [[BOS, 3 + i, EOS] for i in range(40)]
    ld = PackedLoader(make(tmp_path, docs), LoaderConfig(seq_len=2, batch_size=40, lookahead=1), L)
    b = ld.next_batch()["input_ids"].numpy()
    assert sorted(b[:, 1].tolist()) == list(range(3, 43))
