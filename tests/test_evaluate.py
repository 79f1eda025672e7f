"""Perplexity on a tiny Llama built in code."""

from __future__ import annotations

import math

import pytest
import torch

from svdllm_plugin.evaluate import perplexity

VOCAB = 64


@pytest.fixture
def model(tiny_factory):
    return tiny_factory(hidden=16, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture
def windows():
    return torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))  # (W, L)


def test_single_window_matches_hf_loss(model, windows):
    window = windows[:1]
    with torch.no_grad():
        loss = model(input_ids=window, labels=window).loss
    assert perplexity(model, window, progress=False) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_pooled_over_tokens_and_batch_size_invariant(model, windows):
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))  # equal-length windows: mean of means is the pooled mean
    for batch_size in (1, 2, 5, 8):
        ppl = perplexity(model, windows, batch_size=batch_size, progress=False)
        assert ppl == pytest.approx(expected, rel=1e-5)


def test_uniform_logits_give_vocab_size(model, windows):
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each token has probability 1 / VOCAB
    assert perplexity(model, windows, progress=False) == pytest.approx(VOCAB, rel=1e-6)  # fp32 token NLL


def test_sets_eval_mode(model, windows):
    model.train()
    perplexity(model, windows[:1], progress=False)
    assert not model.training


def test_non_finite_is_an_error(model, windows):
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="perplexity is nan.*NaN/inf weights"):
        perplexity(model, windows, progress=False)


@pytest.mark.parametrize(
    "shape, batch_size, match",
    [
        ((12,), 4, r"got shape \(12,\)"),
        ((0, 12), 4, r"got shape \(0, 12\)"),
        ((3, 1), 4, r"got shape \(3, 1\)"),
        ((3, 12), 0, "batch_size must be a positive integer; got 0"),
    ],
)
def test_bad_arguments(model, shape, batch_size, match):
    with pytest.raises(ValueError, match=match):
        perplexity(model, torch.zeros(shape, dtype=torch.long), batch_size=batch_size, progress=False)
