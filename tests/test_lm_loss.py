"""The chunked linear + cross-entropy maths (peftcore.lm_loss) against float64 references written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore import lm_loss

VOCAB, DIM = 37, 12


def _inputs(seed: int = 0, batch: int = 3, seq: int = 9, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, DIM, generator=g)
    weight = torch.randn(VOCAB, DIM, generator=g) * 0.5
    b = torch.randn(VOCAB, generator=g) if bias else None
    labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[2, 6:] = -100  # right padding
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, transform=None, num_items=None, shift_labels=None):
    """transformers' ForCausalLMLoss on full float64 logits, written out: shift, pad, flatten, CE."""
    h, w = hidden.double(), weight.double()
    logits = h @ w.T + (0 if bias is None else bias.double())
    if transform is not None:
        logits = transform(logits)
    if shift_labels is None:
        shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    flat = shift_labels.reshape(-1)
    keep = flat != -100
    logp = torch.log_softmax(logits.reshape(-1, VOCAB), dim=-1)
    nll = -logp[keep].gather(1, flat[keep].unsqueeze(1)).squeeze(1)
    return nll.sum() / (keep.sum() if num_items is None else num_items)


def _grads(loss_fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, None])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_every_gradient_match_the_full_logits_reference(chunk_tokens, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    ours, ours_grads = _grads(
        lambda h, w, bb: lm_loss.causal_lm_loss(h, w, bb, labels, chunk_tokens=chunk_tokens), hidden, weight, b
    )
    ref, ref_grads = _grads(lambda h, w, bb: _reference(h, w, bb, labels), hidden, weight, b)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    for got, want in zip(ours_grads, ref_grads):
        if want is None:
            assert got is None
            continue
        assert got.abs().max() > 0  # every tensor gets a real gradient
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=0)


def test_soft_capping_is_differentiated_through():
    hidden, weight, b, labels = _inputs(seed=1)

    def softcap(x):
        return torch.tanh(x / 2.0) * 2.0

    ours, ours_grads = _grads(
        lambda h, w, bb: lm_loss.causal_lm_loss(h, w, bb, labels, transform=softcap, chunk_tokens=5), hidden, weight, b
    )
    ref, ref_grads = _grads(lambda h, w, bb: _reference(h, w, bb, labels, transform=softcap), hidden, weight, b)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=0)


def test_num_items_in_batch_and_shift_labels_as_transformers_passes_them():
    hidden, weight, b, labels = _inputs(seed=2)
    shift = torch.roll(labels, 1, dims=1)  # any given targets are used as they are, not shifted again
    ours, ours_grads = _grads(
        lambda h: lm_loss.causal_lm_loss(h, weight, b, None, shift_labels=shift, num_items_in_batch=torch.tensor(40)),
        hidden,
    )
    ref, ref_grads = _grads(lambda h: _reference(h, weight, b, None, shift_labels=shift, num_items=40), hidden)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_grads[0].double(), ref_grads[0].double(), atol=1e-6, rtol=0)


def test_no_counted_token_gives_nan_like_cross_entropy_and_zero_gradients():
    hidden, weight, b, labels = _inputs()
    labels = torch.full_like(labels, -100)
    h = hidden.clone().requires_grad_(True)
    loss = lm_loss.causal_lm_loss(h, weight, b, labels)
    full = F.cross_entropy(F.linear(hidden, weight, b).reshape(-1, VOCAB), labels.reshape(-1))
    assert torch.isnan(loss) and torch.isnan(full)
    lm_loss.causal_lm_loss(h, weight, b, labels, num_items_in_batch=1).backward()
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_float32_logits_from_a_bfloat16_head_like_transformers():
    """The head runs in the model's dtype, the cross-entropy on float32 logits: as the full path does."""
    hidden, weight, b, labels = _inputs(seed=3)
    hidden, weight, b = hidden.bfloat16(), weight.bfloat16(), b.bfloat16()

    def full(h, w, bb):
        logits = F.linear(h, w, bb).float()
        targets = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    ours, ours_grads = _grads(lambda h, w, bb: lm_loss.causal_lm_loss(h, w, bb, labels, chunk_tokens=4), hidden,
                              weight, b)
    ref, ref_grads = _grads(full, hidden, weight, b)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for got, want in zip(ours_grads, ref_grads):
        assert got.dtype == torch.bfloat16
        # per-row maths is the same; only the weight's gradient is summed over chunks (in float32 here)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_under_autocast_backward_recomputes_in_the_same_precision():
    hidden, weight, b, labels = _inputs(seed=4)

    def full(h, w, bb):
        targets = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return F.cross_entropy(F.linear(h, w, bb).float().reshape(-1, VOCAB), targets.reshape(-1))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ours_grads = _grads(lambda h, w, bb: lm_loss.causal_lm_loss(h, w, bb, labels, chunk_tokens=4), hidden,
                                  weight, b)
        ref, ref_grads = _grads(full, hidden, weight, b)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for got, want in zip(ours_grads, ref_grads):
        assert got.dtype == torch.float32  # autocast's casts are undone for the gradients, as autograd does
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_token_nll_per_position():
    hidden, weight, b, labels = _inputs(seed=5)
    nll = lm_loss.token_nll(hidden, weight, b, labels, chunk_tokens=5)
    logp = torch.log_softmax(hidden.double() @ weight.double().T + b.double(), dim=-1)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    want = torch.where(targets == -100, 0.0, -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1))
    assert nll.shape == labels.shape
    torch.testing.assert_close(nll.double(), want, atol=1e-5, rtol=0)


def test_bad_labels_are_named():
    hidden, weight, b, labels = _inputs()
    bad = labels.clone()
    bad[1, 3] = VOCAB
    with pytest.raises(ValueError, match=f"label {VOCAB} is outside the vocabulary"):
        lm_loss.causal_lm_loss(hidden, weight, b, bad)
    bad[1, 3] = -5
    with pytest.raises(ValueError, match="label -5 is outside"):
        lm_loss.causal_lm_loss(hidden, weight, b, bad)
    with pytest.raises(ValueError, match=r"labels of shape \(3, 8\) do not match the hidden states \(3, 9\)"):
        lm_loss.causal_lm_loss(hidden, weight, b, labels[:, :8])
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        lm_loss.causal_lm_loss(hidden, weight, b, labels, chunk_tokens=0)


def test_the_largest_temporary_is_one_chunk(monkeypatch):
    """No matmul of the head ever covers more than chunk_tokens rows, forward or backward."""
    hidden, weight, b, labels = _inputs(seq=40)
    rows_seen = []
    real_linear = F.linear

    def spy(x, w, bias=None):
        rows_seen.append(x.shape[0])
        return real_linear(x, w, bias)

    monkeypatch.setattr(lm_loss.F, "linear", spy)
    h = hidden.clone().requires_grad_(True)
    lm_loss.causal_lm_loss(h, weight, b, labels, chunk_tokens=6).backward()
    counted = int((F.pad(labels, (0, 1), value=-100)[..., 1:] != -100).sum())
    assert max(rows_seen) == 6 and sum(rows_seen) == 2 * counted  # forward, then once more in backward
