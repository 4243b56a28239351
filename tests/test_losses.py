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
