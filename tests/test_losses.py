"""The loss meter: per-name sums and counts that combine exactly across micro-batches, steps and ranks."""

import math

import torch

from tessera.tokenizers.layout import MODALITIES, VocabLayout
from tessera.train.loader import IGNORE
from tessera.train.losses import LossMeter, add_token_losses, token_losses

L = VocabLayout(text_size=100, image_codebook_size=16, audio_codebook_size=8, audio_levels=2, max_grid=8, n_reserved=4)


def test_meter_means_are_sums_over_counts():
    a, b = LossMeter(), LossMeter()
    a.update("loss", torch.tensor(6.0), torch.tensor(3))
    a.update("loss", 2.0, 1)
    b.update("loss", 10.0, 4)
    b.update("loss_image", 0.0, 0)
    a.merge(b)
    assert a.all_reduce() is a  # one process: no communication, the values become floats
    assert a.mean("loss") == 18.0 / 8 and a.count("loss") == 8
    assert math.isnan(a.mean("loss_image")) and a.mean("loss_image", empty=0.0) == 0.0
    assert a.means() == {"loss": 18.0 / 8}  # names without tokens are left out
    assert math.isnan(LossMeter().mean("never"))


def test_token_losses_of_split_batches_combine_to_the_whole():
    """Two halves of a batch recorded in one meter give the whole batch's means, per modality too."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, L.padded_vocab_size, generator=g)
    targets = torch.randint(0, L.ranges["text"].end, (4, 12), generator=g)  # text, then some image codes
    targets[1, 3:9] = L.ranges["image"].offset + torch.arange(6)
    targets[0, :5] = IGNORE
    modality = torch.as_tensor(L.modality_table())
    whole, halves = LossMeter(), LossMeter()
    add_token_losses(whole, token_losses(logits, targets, modality, z_loss=1e-4))
    for sl in (slice(0, 2), slice(2, 4)):
        add_token_losses(halves, token_losses(logits[sl], targets[sl], modality, z_loss=1e-4))
    names = {"loss", "z_loss", *(f"loss_{m}" for m in MODALITIES)}
    assert set(whole.sums) == set(halves.sums) == names
    for name in names:
        assert whole.count(name) == halves.count(name)
        a, b = whole.mean(name), halves.mean(name)
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6), name
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=IGNORE)
    assert abs(whole.mean("loss") - float(ce)) < 1e-5
    assert whole.count("loss") == int((targets != IGNORE).sum())
    assert set(whole.means()) == names - {"loss_audio"}  # no audio targets


def test_prefixed_names_are_the_held_out_metrics():
    m = LossMeter()
    add_token_losses(m, {"ce": torch.tensor(3.0), "count": torch.tensor(2), "ce_mod": torch.tensor([3.0, 0.0, 0.0]),
                         "n_mod": torch.tensor([2, 0, 0])}, prefix="eval_")
    assert m.means() == {"eval_loss": 1.5, "eval_loss_text": 1.5}


def _head_case(seed=0):
    from tessera.model.transformer import Transformer, model_preset

    cfg = model_preset("tiny")
    cfg.vocab_size = L.padded_vocab_size
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, L.padded_vocab_size, (3, 20), generator=g)
    targets = torch.randint(0, L.ranges["text"].end, (3, 20), generator=g)
    targets[1, 4:12] = L.ranges["image"].offset + torch.arange(8)
    targets[0, :6] = IGNORE
    return model, ids, targets, torch.as_tensor(L.modality_table())


def _loss_and_grads(model, ids, targets, modality, chunk, dtype=torch.float32):
    from tessera.train.losses import losses_from_ce

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        if chunk:
            ce, lse = model(ids, loss_targets=targets.clamp(min=0), loss_chunk=chunk)
        else:
            logits = model(ids)
    r = losses_from_ce(ce, lse, targets, modality) if chunk else token_losses(logits, targets, modality, z_loss=1.0)
    (r["ce"] + 0.3 * r["z"]).backward()
    return r, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_chunked_head_gives_the_plain_losses_and_gradients():
    """The output head and the loss a chunk of tokens at a time (`model/chunked_ce.py`): in fp32 the same sums
    (CE, z-loss, per modality) and the same gradient of every weight as the logits path, for chunks that do
    and do not divide the batch's tokens."""
    model, ids, targets, modality = _head_case()
    ref, ref_grads = _loss_and_grads(model, ids, targets, modality, chunk=0)
    for chunk in (7, 16, 60, 1000):
        r, grads = _loss_and_grads(model, ids, targets, modality, chunk=chunk)
        for key in ("ce", "z", "ce_mod", "ce_row"):
            assert torch.allclose(r[key], ref[key], rtol=1e-5, atol=1e-5), (chunk, key)
        assert torch.equal(r["n_mod"], ref["n_mod"]) and int(r["count"]) == int(ref["count"])
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), (chunk, name)


def test_the_chunked_head_under_bf16_autocast_stays_close_to_the_plain_path():
    model, ids, targets, modality = _head_case(seed=1)
    ref, ref_grads = _loss_and_grads(model, ids, targets, modality, chunk=0, dtype=torch.bfloat16)
    r, grads = _loss_and_grads(model, ids, targets, modality, chunk=16, dtype=torch.bfloat16)
    assert torch.allclose(r["ce"], ref["ce"], rtol=1e-2)
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_the_chunked_head_refuses_a_chunk_of_no_tokens():
    import pytest

    from tessera.model.chunked_ce import linear_cross_entropy

    with pytest.raises(ValueError, match="positive"):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 0)


def test_the_chunked_heads_gradients_pass_gradcheck_in_float64():
    """The hand-written backward against finite differences: both outputs weighted, chunks that do not divide
    the tokens."""
    from tessera.model.chunked_ce import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    weights = torch.rand(2, 7, dtype=torch.float64, generator=g)

    def f(h, w):
        ce, lse = linear_cross_entropy(h, w, targets, 3)
        return (weights[0] * ce + weights[1] * lse).sum()

    assert torch.autograd.gradcheck(f, (h, w))


def test_the_chunked_heads_backward_keeps_the_forwards_dtype_under_a_callers_autocast():
    """A backward run inside a bf16 autocast region (the forward was fp32) gives the fp32 gradients."""
    from tessera.model.chunked_ce import linear_cross_entropy

    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (9,), generator=g)
    grads = []
    for autocast in (False, True):
        ce, _ = linear_cross_entropy(h, w, targets, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            grads.append(torch.autograd.grad(ce.sum(), (h, w)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_loss_chunk_without_targets_is_refused():
    import pytest

    model, ids, _, _ = _head_case()
    with pytest.raises(ValueError, match="loss_targets"):
        model(ids, loss_chunk=8)
