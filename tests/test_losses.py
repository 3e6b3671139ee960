"""Losses in losses.py on tiny hand-computed cases.

    python -m pytest -x -q tests/test_losses.py
"""
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import advantages, grpo_loss, kl_token_mask, rwr_loss, sample_pairs, score_dpo_loss, token_weights  # noqa: E402

D = torch.float64


def test_advantages():
    a = advantages([1.0, 0.0, 0.0, 1.0])  # mean .5, population std .5
    assert a == pytest.approx([x * 0.5 / (0.5 + 1e-6) for x in (1.0, -1.0, -1.0, 1.0)])
    s = [0.2, 0.4, 0.9]
    mean = sum(s) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in s) / 3)  # population, not sample, std
    assert advantages(s) == pytest.approx([(x - mean) / (sd + 1e-6) for x in s])
    for same in ([0.1, 0.1, 0.1], [0.7, 0.7], [1, 1, 1, 1]):
        assert advantages(same) == [0.0] * len(same)  # exact zeros, not float dust / 1e-6


def test_token_weights():
    seg = torch.tensor([0, 0, 0, 1, 2, 2])
    torch.testing.assert_close(token_weights(seg, 3, "token"), torch.full((6,), 1 / 6, dtype=D))
    torch.testing.assert_close(token_weights(seg, 3, "seq"), torch.tensor([1 / 9] * 3 + [1 / 3] + [1 / 6] * 2, dtype=D))
    torch.testing.assert_close(token_weights(torch.tensor([0, 0, 2]), 3, "seq"), torch.tensor([0.25, 0.25, 0.5], dtype=D))
    with pytest.raises(ValueError, match="agg"):
        token_weights(seg, 3, "sum")


def test_grpo_seq_agg_is_mean_of_sequence_means():
    seg = torch.tensor([0, 0, 0, 1, 2, 2])
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(6, generator=g, dtype=D) * 0.1 - 1 for _ in range(3))
    adv = torch.tensor([0.5, -1.0, 0.3], dtype=D)
    _, m = grpo_loss(logp, old, ref, adv, seg, kl="none", agg="seq")
    rho = torch.exp(logp - old)
    pg = -torch.minimum(rho * adv[seg], rho.clamp(0.8, 1.2) * adv[seg])
    want = torch.stack([pg[seg == i].mean() for i in range(3)]).mean()
    assert abs(m["pg"] - want.item()) < 1e-12
    loss, _ = grpo_loss(logp, old, ref, adv, seg, kl="none", agg="seq")
    assert abs(loss.item() - want.item()) < 1e-12


def two_sequences():
    # seq 0 (A = +1) tokens 0-1, seq 1 (A = -1) tokens 2-3; theta = old, ref is half as likely
    seg = torch.tensor([0, 0, 1, 1])
    adv = torch.tensor([1.0, -1.0], dtype=D)
    old = torch.log(torch.tensor([0.5, 0.25, 0.5, 0.25], dtype=D))
    ref = old + math.log(0.5)
    return seg, adv, old, ref


def test_masked_kl_ignores_negative_advantage_sequences():
    seg, adv, old, ref = two_sequences()
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log 0.5: 0.19315
    out = {}
    for kl in ("masked", "full", "none"):
        logp = old.clone().requires_grad_()
        loss, m = grpo_loss(logp, old, ref, adv, seg, beta=0.5, kl=kl)
        loss.backward()
        out[kl] = (loss.item(), logp.grad.clone())
        assert abs(m["kl"] - k3) < 1e-12  # the metric reports k3 on all tokens, whatever the mask
    pg = 0.0  # at rho = 1: pg = -A per token, token-mean over +1,+1,-1,-1
    assert abs(out["none"][0] - pg) < 1e-12
    assert abs(out["masked"][0] - (pg + 0.5 * 2 * k3 / 4)) < 1e-12  # only seq 0's 2 tokens
    assert abs(out["full"][0] - (pg + 0.5 * 4 * k3 / 4)) < 1e-12
    # gradient on the negative sequence: masked == no KL at all; full differs (dk3/dlogp = 1 - exp(d) = .5)
    torch.testing.assert_close(out["masked"][1][2:], out["none"][1][2:], rtol=0, atol=0)
    torch.testing.assert_close(out["full"][1][2:] - out["none"][1][2:], torch.full((2,), 0.5 * 0.5 / 4, dtype=D))
    torch.testing.assert_close(out["masked"][1][:2] - out["none"][1][:2], torch.full((2,), 0.5 * 0.5 / 4, dtype=D))
    assert torch.equal(kl_token_mask(adv, seg, "masked"), torch.tensor([1.0, 1, 0, 0]))
    with pytest.raises(ValueError, match="kl"):
        kl_token_mask(adv, seg, "half")


def test_clipping_zeroes_gradient():
    seg = torch.tensor([0, 1, 2, 3])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=D)
    old = torch.zeros(4, dtype=D)
    # rho = 1.5 (A>0: clipped), 0.5 (A<0: clipped), 1.5 (A<0: not clipped), 0.5 (A>0: not clipped)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5], dtype=D)).requires_grad_()
    loss, m = grpo_loss(logp, old, old, adv, seg, eps=0.2, kl="none")
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, 1.5 / 4, -0.5 / 4], dtype=D))
    assert m["clip_frac"] == 0.5 and abs(m["ratio_mean"] - 1.0) < 1e-12
    # loss: -(1.2*1) - (0.8*-1) - (1.5*-1) - (0.5*1), token mean
    assert abs(loss.item() - (-1.2 + 0.8 + 1.5 - 0.5) / 4) < 1e-12


def test_on_policy_gradient_is_plain_policy_gradient():
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(7, 11, generator=g, dtype=D, requires_grad=True)  # per-token logits
    y = torch.randint(0, 11, (7,), generator=g)
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    adv = torch.tensor([0.9, -1.3, 0.4], dtype=D)
    logp = torch.log_softmax(theta, -1).gather(1, y[:, None]).squeeze(1)
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, seg, kl="full")  # theta = old = ref
    (grad,) = torch.autograd.grad(loss, theta)
    logp = torch.log_softmax(theta, -1).gather(1, y[:, None]).squeeze(1)
    (want,) = torch.autograd.grad(-(adv[seg] * logp).sum() / 7, theta)
    torch.testing.assert_close(grad, want)


def test_score_dpo():
    lw, rw, ll, rl = (torch.tensor(v, dtype=D) for v in ([-3.0, -1.0], [-5.0, -1.5], [-4.0, -2.0], [-3.0, -2.5]))
    dpo = -torch.nn.functional.logsigmoid(0.1 * ((lw - rw) - (ll - rl))).mean()
    torch.testing.assert_close(score_dpo_loss(lw, rw, ll, rl, 1.0, 0.0), dpo)
    # pair 0 by hand: r_w = 2, r_l = -1 -> z = 0.3 -> log(1 + e^-0.3)
    assert abs(score_dpo_loss(lw[:1], rw[:1], ll[:1], rl[:1], 1.0, 0.0).item() - math.log1p(math.exp(-0.3))) < 1e-12
    # with scores: z = 0.1 (0.5 * 2 - (1 - 0.5) * -1) = 0.15
    got = score_dpo_loss(lw[:1], rw[:1], ll[:1], rl[:1], torch.tensor([0.5]), torch.tensor([0.5]))
    assert abs(got.item() - math.log1p(math.exp(-0.15))) < 1e-12


def test_sample_pairs_follow_cubed_gaps():
    scores = [0.0, 0.3, 0.6, 1.0, 0.6]
    k = 10_000
    pairs = sample_pairs(scores, k, seed=0)
    assert len(pairs) == k and all(scores[w] > scores[l] for w, l in pairs)
    allowed = [(i, j) for i in range(5) for j in range(5) if scores[i] > scores[j]]
    assert set(pairs) <= set(allowed) and (2, 4) not in allowed  # ties are never pairs
    wts = [(scores[i] - scores[j]) ** 3 for i, j in allowed]
    count = Counter(pairs)
    chi2 = sum((count[p] - k * w / sum(wts)) ** 2 / (k * w / sum(wts)) for p, w in zip(allowed, wts))
    # chi-square critical value, df = 9 - 1 = 8, p = 0.001: 26.12 (standard table). Seeded, so not flaky;
    # proportional-to-gap (not cubed) sampling gives chi2 in the thousands
    assert len(allowed) == 9 and chi2 < 26.12
    assert sample_pairs(scores, k, seed=0) == pairs  # seeded
    assert sample_pairs([0.5, 0.5, 0.5], 10, seed=0) == []


def test_rwr_weights():
    r = torch.tensor([1.0, 0.5, 0.0], dtype=D)
    x = torch.tensor([-1.0, -2.0, -0.5], dtype=D, requires_grad=True)
    loss = rwr_loss(x, r, tau=0.4)
    w = torch.exp(r / 0.4)
    assert abs(loss.item() - (-(w * x).sum() / w.sum()).item()) < 1e-12
    loss.backward()
    torch.testing.assert_close(x.grad, -w / w.sum())
    big = rwr_loss(torch.tensor([-1.0, -2.0]), torch.tensor([1000.0, 999.0]))  # no overflow
    w = 1 / (1 + math.exp(-1 / 0.4))
    assert abs(big.item() - (w * 1 + (1 - w) * 2)) < 1e-6
