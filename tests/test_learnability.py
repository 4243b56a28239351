"""The codes' learnability estimate separates predictable, memorizable and random code streams."""

import math

import numpy as np

from tessera.unimodal.learnability import code_learnability, unigram_entropy


def test_unigram_entropy():
    assert unigram_entropy([np.array([0, 1, 2, 3])], 4) == np.log(4)
    assert unigram_entropy([np.zeros(10, dtype=int)], 4) == 0.0


def test_structured_codes_are_learnable_and_random_codes_are_not():
    rng = np.random.default_rng(0)
    vocab = 32
    # Each sequence counts up from a random start: unseen sequences are predictable from their context.
    ramp = lambda: (rng.integers(vocab) + np.arange(24)) % vocab
    structured = code_learnability([ramp() for _ in range(200)], [ramp() for _ in range(40)], vocab, steps=150)
    noise = code_learnability([rng.integers(vocab, size=24) for _ in range(200)],
                              [rng.integers(vocab, size=24) for _ in range(40)], vocab, steps=150)
    assert structured["uniform"] == round(math.log(vocab), 4)
    assert structured["prior_heldout_ce"] < 0.3 * structured["uniform"]
    # Random codes: no context helps; the prior cannot beat their (uniform) entropy on held-out data.
    assert noise["prior_heldout_ce"] > 0.9 * noise["unigram_entropy"]
    assert noise["prior_heldout_ce"] > structured["prior_heldout_ce"] + 2.0


def test_memorized_codes_show_a_gap():
    rng = np.random.default_rng(1)
    vocab = 64
    train = [rng.integers(vocab, size=16) for _ in range(8)]  # few random sequences, seen many times
    r = code_learnability(train, [rng.integers(vocab, size=16) for _ in range(20)], vocab, steps=300, seq_len=32)
    assert r["prior_gap"] > 1.0 and r["prior_train_ce"] < r["unigram_entropy"]
