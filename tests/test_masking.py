import pytest
import torch

from omni_model.masking import add_tail_pad, diffusion_loss, mask_for_training

MASK, PAD = 99, 98


def _batch(rows=4000, prompt=10, content=20, pads=10):
    ids = torch.randint(0, 90, (rows, prompt + content + pads))
    ids[:, prompt + content:] = PAD
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, prompt:] = True
    return ids, response, slice(0, prompt), slice(prompt, prompt + content), \
        slice(prompt + content, None)


def test_mask_rates_follow_t_and_attenuate_pads():
    gen = torch.Generator().manual_seed(0)
    ids, response, prompt, content, pads = _batch()
    out = mask_for_training(ids, response, MASK, PAD, pad_ratio=0.6, generator=gen)
    t = out.t[:, 0]
    assert out.t.shape == ids.shape and (out.t == t[:, None]).all()  # one t per sample
    assert 1e-3 <= t.min() and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.02  # t ~ U(eps, 1)
    m = out.target_mask.float()
    assert m[:, prompt].sum() == 0  # prompt tokens are never masked
    content_rate = m[:, content].mean(1)
    pad_rate = m[:, pads].mean(1)
    # over many draws: E[masked content] = t and E[masked pads] = 0.6 t
    assert abs(content_rate.sum() / t.sum() - 1) < 0.02
    assert abs(pad_rate.sum() / (0.6 * t).sum() - 1) < 0.03
    for lo, hi in [(0.0, 0.2), (0.4, 0.6), (0.8, 1.0)]:
        sel = (t >= lo) & (t < hi)
        mid = t[sel].mean()
        assert abs(content_rate[sel].mean() - mid) < 0.02
        assert abs(pad_rate[sel].mean() - 0.6 * mid) < 0.02
    masked = out.target_mask
    assert (out.noisy_ids[masked] == MASK).all()
    assert torch.equal(out.noisy_ids[~masked], ids[~masked])


def test_pad_ratio_one_masks_pads_like_content():
    gen = torch.Generator().manual_seed(1)
    ids, response, _, content, pads = _batch(rows=3000)
    out = mask_for_training(ids, response, MASK, PAD, pad_ratio=1.0, generator=gen)
    m = out.target_mask.float()
    assert abs(m[:, content].mean() - m[:, pads].mean()) < 0.01


def test_cosine_schedule_puts_two_thirds_of_the_samples_above_half_masked():
    ids, response, _, content, _ = _batch(rows=4000)
    uniform = mask_for_training(ids, response, MASK, PAD, generator=torch.Generator().manual_seed(0))
    cosine = mask_for_training(ids, response, MASK, PAD, generator=torch.Generator().manual_seed(0),
                               schedule="cosine")
    t_u, t_c = uniform.t[:, 0], cosine.t[:, 0]
    assert abs((t_u > 0.5).float().mean() - 0.5) < 0.03
    assert abs((t_c > 0.5).float().mean() - 2 / 3) < 0.03  # P(cos(pi u / 2) > 1/2) = 2/3
    # the masked share follows t: more masks under the cosine schedule
    assert cosine.target_mask[:, content].float().mean() > uniform.target_mask[:, content].float().mean() + 0.1
    with pytest.raises(ValueError, match="schedule"):
        mask_for_training(ids, response, MASK, PAD, schedule="linear")


def test_packed_documents_get_their_own_t():
    ids, response, *_ = _batch(rows=8)
    docs = torch.zeros_like(ids)
    docs[:, 20:] = 1
    out = mask_for_training(ids, response, MASK, PAD, doc_ids=docs,
                            generator=torch.Generator().manual_seed(0))
    assert (out.t[:, :20] == out.t[:, :1]).all() and (out.t[:, 20:] == out.t[:, 20:21]).all()
    assert (out.t[:, 0] != out.t[:, 20]).all()


def test_add_tail_pad_draws_one_to_n_pads():
    ids = torch.arange(5)
    resp = torch.tensor([False, False, True, True, True])
    gen = torch.Generator().manual_seed(0)
    counts = set()
    for _ in range(400):
        out, out_resp = add_tail_pad(ids, resp, PAD, max_pads=6, generator=gen)
        n = len(out) - 5
        counts.add(n)
        assert torch.equal(out[:5], ids) and (out[5:] == PAD).all()
        assert out_resp[5:].all() and torch.equal(out_resp[:5], resp)
    assert counts == set(range(1, 7))
    assert len(add_tail_pad(ids, resp, PAD, 6, num_pads=3)[0]) == 8


def test_loss_counts_masked_positions_only_and_weights_by_one_over_t():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 12, requires_grad=True)
    target = torch.randint(0, 12, (2, 6))
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([0.5, 0.25])
    plain = diffusion_loss(logits, target, mask, t, weighting="none")
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    assert torch.allclose(plain, ce)
    elbo = diffusion_loss(logits, target, mask, t, weighting="elbo")
    per_token = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="none")
    weights = torch.tensor([2.0, 2.0, 4.0, 4.0, 4.0])
    assert torch.allclose(elbo, (per_token * weights).mean())
    # logits at unmasked positions do not matter
    changed = logits.detach().clone()
    changed[~mask] = 100.0
    assert torch.allclose(diffusion_loss(changed, target, mask, t, "none"), plain)
    per_position = diffusion_loss(logits, target, mask, t, "elbo", reduction="none")
    assert per_position.shape == (2, 6) and (per_position[~mask] == 0).all()
    elbo.backward()
    assert logits.grad[~mask].abs().sum() == 0


def test_loss_with_nothing_masked_is_zero_and_differentiable():
    logits = torch.randn(1, 4, 8, requires_grad=True)
    loss = diffusion_loss(logits, torch.zeros(1, 4, dtype=torch.long),
                          torch.zeros(1, 4, dtype=torch.bool), torch.ones(1))
    assert loss.item() == 0.0
    loss.backward()


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        mask_for_training(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), MASK, PAD,
                          pad_ratio=1.5)
    with pytest.raises(ValueError):
        diffusion_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long),
                       torch.ones(1, 2, dtype=torch.bool), torch.ones(1), weighting="bogus")
