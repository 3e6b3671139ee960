"""Every loss of the method as a pure tensor function of per-token log-probs, and the group
advantages (ARCHITECTURE §6, §7).

    python -m pytest tests/test_losses.py tests/test_kernel.py -q      # the losses; each fused kernel against them

The naive losses (grpo_loss, score_dpo_loss, rwr_loss) are the reference: kernels.py computes the
same quantities from hidden states and the LM head (fused_logprobs, fused_grpo_loss) and is tested
against them. advantages is the group normalisation that curate.py writes into the groups;
token_weights and kl_token_mask are the per-token weights the fused GRPO loss takes.
"""
import random
import statistics

import torch


def advantages(scores, std_floor=0.0):
    """A_i = (s_i - mean) / (max(std, std_floor) + 1e-6), population std over the group (the group
    *is* the population being compared, not a sample of one). With a cost in the score, a group
    whose workflows are all right differs by cost alone: its small std would blow a few hundredths
    of score up to advantages of +-1, as large as right against wrong; a floor caps that gain."""
    if max(scores) - min(scores) <= 1e-6:  # no signal: exact zeros, not float dust / 1e-6
        return [0.0] * len(scores)
    mean = sum(scores) / len(scores)
    std = max(statistics.pstdev(scores), std_floor)
    return [(s - mean) / (std + 1e-6) for s in scores]


def token_weights(seg, n_seq, agg):
    """Aggregation weight of each token, so that loss = sum_t w_t l_t.
    agg="token": 1 / sum_i T_i.  agg="seq": 1 / (n_nonempty T_i), the mean over sequences of each
    sequence's token mean (sequences without tokens do not count). Computed once for the full batch
    and sliced per micro-batch, micro-batch losses add up to the full-batch loss exactly."""
    seg = torch.as_tensor(seg, dtype=torch.long)  # float64 weights: cast down by the caller
    if agg == "token":
        return torch.full(seg.shape, 1.0 / max(seg.numel(), 1), dtype=torch.float64, device=seg.device)
    if agg == "seq":
        T = torch.bincount(seg, minlength=n_seq).double()
        return 1.0 / (T[seg] * (T > 0).sum())
    raise ValueError(f"agg must be 'token' or 'seq', got {agg!r}")


def kl_token_mask(adv, seg, kl):
    """1 on tokens whose KL term counts. kl="masked": only sequences with A > 0 (the KL anchors the
    policy where it is pushed up; below-average workflows are free to be unlearned), "full": all, "none": none."""
    a = torch.as_tensor(adv)[seg]
    if kl == "masked":
        return (a > 0).float()
    if kl in ("full", "none"):
        return torch.full_like(a, float(kl == "full"), dtype=torch.float32)
    raise ValueError(f"kl must be 'masked', 'full' or 'none', got {kl!r}")


def grpo_loss(logp, old_logp, ref_logp, adv, seg, beta=0.1, eps=0.2, kl="masked", agg="token"):
    """ioGRPO + advantage-masked k3 KL (ARCHITECTURE §7) on flat per-token log-probs [N].
    adv [n_seq] per sequence, seg [N] the sequence index of each token.
    Returns (loss, metrics); metrics (floats) are token-weighted like the loss: pg, kl (k3 on all
    tokens, whatever the mask), clip_frac, ratio_mean, weight (sum of the token weights)."""
    adv = torch.as_tensor(adv, dtype=logp.dtype, device=logp.device)
    seg = torch.as_tensor(seg, dtype=torch.long, device=logp.device)
    if not (logp.shape == old_logp.shape == ref_logp.shape == seg.shape):
        raise ValueError(f"logp, old_logp, ref_logp, seg shapes differ: {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(ref_logp.shape)}, {tuple(seg.shape)}")
    w = token_weights(seg, len(adv), agg).to(logp.dtype)
    m = kl_token_mask(adv, seg, kl).to(logp.dtype)
    a = adv[seg]
    rho = torch.exp(logp - old_logp)
    pg = -torch.minimum(rho * a, torch.clamp(rho, 1 - eps, 1 + eps) * a)
    d = ref_logp - logp
    k3 = torch.exp(d) - d - 1
    loss = (w * (pg + beta * m * k3)).sum()
    with torch.no_grad():
        clipped = ((a > 0) & (rho > 1 + eps)) | ((a < 0) & (rho < 1 - eps))
        metrics = {"pg": (w * pg).sum().item(), "kl": (w * k3).sum().item(),
                   "clip_frac": (w * clipped).sum().item(), "ratio_mean": (w * rho).sum().item(), "weight": w.sum().item()}
    return loss, metrics


def score_dpo_loss(logp_w, ref_w, logp_l, ref_l, s_w, s_l, beta=0.1):
    """Score-DPO (ScoreFlow): -log sigmoid(beta [s_w r_w - (1 - s_l) r_l]), r = logp - ref summed over
    each sequence's tokens; inputs [P] per pair, mean over pairs. s_w = 1, s_l = 0 is plain DPO."""
    s_w = torch.as_tensor(s_w, dtype=logp_w.dtype, device=logp_w.device)
    s_l = torch.as_tensor(s_l, dtype=logp_w.dtype, device=logp_w.device)
    z = beta * (s_w * (logp_w - ref_w) - (1 - s_l) * (logp_l - ref_l))
    return -torch.nn.functional.logsigmoid(z).mean()


def sample_pairs(scores, k, seed):
    """k (winner, loser) index pairs with s_w > s_l, drawn with replacement with probability
    proportional to (s_w - s_l)^3: clear-cut pairs dominate, near-ties are rarely shown. [] if none."""
    s = [float(x) for x in scores]
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]
    if not pairs or k <= 0:
        return []
    return random.Random(seed).choices(pairs, weights=[(s[i] - s[j]) ** 3 for i, j in pairs], k=k)


def rwr_loss(seq_mean_logp, rewards, tau=0.4):
    """Reward-weighted regression (RLAO / W4S): w = exp(r / tau) normalized over the batch,
    loss = -sum w * mean_t logp / sum w. The max is subtracted first (same weights, no overflow)."""
    r = torch.as_tensor(rewards, dtype=seq_mean_logp.dtype, device=seq_mean_logp.device)
    w = torch.exp((r - r.max()) / tau)
    return -(w * seq_mean_logp).sum() / w.sum()
