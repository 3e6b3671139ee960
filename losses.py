"""Every loss of the method: the reference functions of per-token log-probs, the group advantages,
and the training losses that train.update runs, one class per `--loss` (ARCHITECTURE §6, §7).

    python -m pytest tests/test_losses.py tests/test_kernel.py tests/test_train.py -q

The naive losses (grpo_loss, score_dpo_loss, rwr_loss) are the reference: kernels.py computes the
same quantities from hidden states and the LM head (fused_logprobs, fused_grpo_loss) and is tested
against them. advantages is the group normalisation that curate.py writes into the groups. LOSSES
names the training losses (GRPO, ScoreDPO, RWR): each is one class that says what it takes from
the groups, what it computes once per optimizer step and its loss on one micro-batch through the
kernels; train.update runs whichever `--loss` names through that interface (class Loss).
"""
import random
import statistics

import torch

import config
import kernels


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


# ---- the training losses: what train.update runs, one class per --loss ----

def _per_token(mb, key, device):
    """The per-token list `key` of every sequence of a micro-batch, concatenated in order."""
    return torch.tensor([x for s in mb for x in s[key]], device=device)


class Loss:
    """The interface train.update calls, the same whatever the loss. A subclass declares
      knobs      the config knobs it reads (set as attributes when it is built from the config),
      unit       sequences a micro-batch never splits (2 for a pair whose members are compared),
      base_ref   True when pi_ref is the base model whatever --ref says,
    and defines
      units(groups, seq, seed)  what it takes from one iteration's groups: a list of units (a step
                 draws --groups-per-step of them), each a list of sequences; seq(g, m) is member m
                 of group g as {"ids", "n_prompt"}, to which the loss adds the fields it reads;
                 seed seeds whatever it samples (Score-DPO's pairs),
      prepare(seqs)  what needs the whole optimizer step (token weights, a softmax over the step),
                 stored on each sequence, so that micro-batch losses add up to the step's loss,
      loss(h, W, y, mb)  one micro-batch's loss tensor and metrics (floats that add up over
                 micro-batches) from the completion tokens' hidden states h, LM head W, targets y;
                 each sequence also carries "old", "ref" (per-token pi_old, pi_ref) and "ref_sum",
      summary(metrics)  the train_log fields of one step from its summed metrics."""
    knobs, unit, base_ref = (), 1, False

    def __init__(self, cfg):
        for k in self.knobs:
            setattr(self, k, cfg[k])

    def summary(self, metrics):
        return {}


class GRPO(Loss):
    """SPOGW's ioGRPO with the advantage-masked KL: a unit is one curated group, each member a
    sequence with its advantage; the fused kernel forms the loss from the hidden states."""
    knobs = ("beta", "eps", "kl", "agg", "chunk_size")

    def units(self, groups, seq, seed):
        return [[dict(seq(g, m), adv=m["advantage"]) for m in g["members"]] for g in groups]

    def prepare(self, seqs):
        n = [len(s["ids"]) - s["n_prompt"] for s in seqs]
        seg = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(n))
        w = token_weights(seg, len(seqs), self.agg).float()
        km = kl_token_mask(torch.tensor([s["adv"] for s in seqs]), seg, self.kl)
        for s, wi, ki in zip(seqs, w.split(n), km.split(n)):
            s.update(w_t=wi.tolist(), km_t=ki.tolist(), adv_t=[s["adv"]] * len(wi))

    def loss(self, h, W, y, mb):
        cat = lambda key: _per_token(mb, key, h.device)
        return kernels.fused_grpo_loss(h, W, y, cat("old"), cat("ref"), cat("adv_t"), cat("w_t"), cat("km_t"),
                                       self.beta, self.eps, self.chunk_size)

    def summary(self, m):
        return {"pg": m.get("pg"), "kl": m.get("kl"), "clip_frac": m.get("clip_frac"),
                "ratio": m["ratio_mean"] / m["weight"] if m else None}


class ScoreDPO(Loss):
    """ScoreFlow's Score-DPO: a unit is one problem, its members sampled (winner, loser) pairs of the
    distinct workflows of its groups, adjacent; pi_ref is the base model."""
    knobs, unit, base_ref = ("beta", "pairs_per_problem", "chunk_size"), 2, True

    def units(self, groups, seq, seed):
        by_problem = {}
        for g in groups:  # a problem's groups overlap: pool its distinct workflows
            pool = by_problem.setdefault(g["problem_id"], {})
            for m in g["members"]:
                pool[m["sample"]] = (g, m)
        units = []
        for k, pid in enumerate(sorted(by_problem)):
            ms = list(by_problem[pid].values())
            pairs = sample_pairs([m["score"] for _, m in ms], self.pairs_per_problem, config.seed_of(seed, k))
            unit = [dict(seq(*ms[i]), score=ms[i][1]["score"]) for w, l in pairs for i in (w, l)]
            if unit:
                units.append(unit)
        return units

    def prepare(self, seqs):
        for s in seqs:  # the step's pairs: a micro-batch's mean over its pairs is scaled by its share
            s["step_pairs"] = len(seqs) / 2

    def loss(self, h, W, y, mb):
        logp = kernels.fused_logprobs(h, W, y, self.chunk_size)
        dev, dt = h.device, logp.dtype
        n = torch.tensor([len(s["ids"]) - s["n_prompt"] for s in mb], device=dev)
        seg = torch.repeat_interleave(torch.arange(len(mb), device=dev), n)
        sums = torch.zeros(len(mb), device=dev, dtype=dt).index_add(0, seg, logp)  # sequence sums
        ref = torch.tensor([s["ref_sum"] for s in mb], device=dev, dtype=dt)
        sc = torch.tensor([s["score"] for s in mb], device=dev, dtype=dt)
        share = (len(mb) / 2) / mb[0]["step_pairs"]
        return score_dpo_loss(sums[0::2], ref[0::2], sums[1::2], ref[1::2], sc[0::2], sc[1::2], self.beta) * share, {}


class RWR(Loss):
    """W4S's reward-weighted regression: a unit is one group, each member a sequence with its
    score; rwr_loss (one batch) is the reference it is tested against."""
    knobs = ("tau", "chunk_size")

    def units(self, groups, seq, seed):
        return [[dict(seq(g, m), score=m["score"]) for m in g["members"]] for g in groups]

    def prepare(self, seqs):
        w = torch.softmax(torch.tensor([s["score"] for s in seqs]) / self.tau, 0)  # exp(r/tau) / sum exp(r/tau)
        for s, wi, Ti in zip(seqs, w.tolist(), (len(x["ids"]) - x["n_prompt"] for x in seqs)):
            s["w_t"] = [wi / Ti] * Ti  # -sum_i w_i mean_t logp_it as a token-weighted sum

    def loss(self, h, W, y, mb):
        return -(_per_token(mb, "w_t", h.device) * kernels.fused_logprobs(h, W, y, self.chunk_size)).sum(), {}


# the --loss choices; config.KNOBS["loss"] lists the same names (a test checks it)
LOSSES = {"grpo": GRPO, "scoredpo": ScoreDPO, "rwr": RWR}


def make(cfg):
    """The loss that cfg["loss"] names, built with its knobs."""
    if cfg["loss"] not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}")
    return LOSSES[cfg["loss"]](cfg)
