"""The fused LM-head kernels: log-probs and the GRPO loss straight from hidden states and the LM
head, chunk by chunk, with hand-written backward passes (ARCHITECTURE §8).

    python -m pytest tests/test_kernel.py -q      # each kernel against its naive twin in losses.py
    python bench.py kernel --quick                # speed and memory against naive autograd

fused_logprobs(h, W, y) is log softmax(h W^T)[y]; fused_grpo_loss is losses.grpo_loss computed from
the same inputs. Neither ever holds [tokens x vocab] logits; auto_chunk picks the rows per chunk.
"""
import torch

# The LM head is the memory hog of RL fine-tuning: [tokens x vocab] fp32 logits for 4k
# completion tokens and a 152k vocab are 2.5 GB, and autograd keeps ~3 such arrays alive.
# Here nothing bigger than [chunk x vocab] ever exists. Matmuls run in the input dtype
# (fast path), the softmax math in fp32 (fp64 for fp64 inputs, which gradcheck needs).

CHUNK_BYTES = 256 * 10**6  # auto chunk: the [chunk x V] scratch stays under this (256 MB, so also 256 MiB)


# rows per chunk, (floor, cap); the floor is the fewest rows whose matmuls still run near full speed:
# on an H200 (7B head) 128 rows take 1.48x naive time, 256 rows 1.07x; on CPU (fp32, H=576, V=49152,
# 1 thread) 32 rows take 1.57x the time of 1024 rows, 64 rows 1.21x, 128 rows 1.03x
CHUNK_ROWS = {"cuda": (128, 1024), "cpu": (64, 1024)}


def _acc_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def auto_chunk(vocab, device="cpu", dtype=torch.float32):
    """Tokens per chunk of the fused kernels for a [vocab x H] LM head: the largest power of two whose
    [chunk x vocab] scratch (fp32, plus a copy in dtype when that is narrower) fits CHUNK_BYTES, within
    the device's CHUNK_ROWS (the floor wins for vocabularies so big that even it does not fit)."""
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))
    acc = _acc_dtype(dtype)
    per_row = int(vocab) * (acc.itemsize + (dtype.itemsize if dtype != acc else 0))
    floor, cap = CHUNK_ROWS.get(torch.device(device).type, CHUNK_ROWS["cuda"])
    rows = max(1, CHUNK_BYTES // per_row)
    return max(floor, min(cap, 1 << (rows.bit_length() - 1)))


class ChunkBuffers:
    """One [chunk x V] scratch array reused by every chunk: on CPU a fresh tensor per chunk (up to the 256 MB
    scratch bound, CHUNK_BYTES) would be a fresh mmap, i.e. page faults on every chunk. Low-precision inputs also need a
    matmul-dtype buffer (the mm output, and the gradient cast back for the second mm)."""

    def __init__(self, rows, weight):
        V, acc = weight.shape[0], _acc_dtype(weight.dtype)
        self.acc = torch.empty(rows, V, dtype=acc, device=weight.device)
        self.low = None if acc == weight.dtype else torch.empty(rows, V, dtype=weight.dtype, device=weight.device)

    def logits(self, h, weight):
        """h W^T for one chunk, as an fp32 view into the scratch buffer (overwritten next chunk)."""
        n = h.shape[0]
        if self.low is None:
            return torch.mm(h, weight.t(), out=self.acc[:n])
        torch.mm(h, weight.t(), out=self.low[:n])
        return self.acc[:n].copy_(self.low[:n])

    def lowp(self, x):
        """x (an fp32 chunk array) in the matmul dtype."""
        return x if self.low is None else self.low[: x.shape[0]].copy_(x)


def _exp_shifted_(logits):
    """In place: logits <- exp(logits - rowmax). Returns (rowmax, rowsum of the new values).
    Two passes over the chunk and no temporary, unlike torch.logsumexp."""
    m = logits.amax(1, keepdim=True)
    s = logits.sub_(m).exp_().sum(1)
    return m.squeeze(1), s


def _chunk_grads_(e, rowsum, g, h, y, weight, buf, dw):
    """One chunk's gradients, given e = exp(logits - rowmax) [n x V] in fp32 (overwritten), its row sums
    and g = dloss/dlogp [n]. dlogits = g (onehot(y) - p) = -(g / rowsum) e' with e' = e - rowsum onehot(y):
    the one-hot is subtracted here, in fp32, before anything is rounded to the matmul dtype. For a
    confident token (p_y -> 1) 1 - p_y is far below bf16's resolution of p_y, so forming p W in bf16 and
    subtracting W[y] afterwards leaves rounding noise (59 % error at p in [0.99, 0.999)). g / rowsum is
    folded in on the small [n x H] side, so the [n x V] array is never scaled.
    Adds dlogits^T h to dw (fp32) when dw is given; returns dh = dlogits W (fp32) when buf is given."""
    e.scatter_add_(1, y[:, None], -rowsum[:, None])
    scale = -g / rowsum
    if dw is not None:
        dw.addmm_(e.t(), scale[:, None] * h.to(dw.dtype))
    if buf is not None:
        return scale[:, None] * torch.mm(buf.lowp(e), weight).to(scale.dtype)


class FusedLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[y] chunk by chunk. Two backward paths:
    - head frozen (form_dh: only h needs a gradient, the LoRA case and the one measured): dlogp_t/dh_t =
      (onehot(y_t) - p_t) W depends on nothing upstream, so the forward forms it per chunk while it has p
      and keeps it [N x H] (fp32); backward scales its rows by the upstream gradient. Two head-sized
      matmuls in all, like naive autograd, instead of three.
    - head trainable: dW = sum_t g_t (onehot - p_t)^T h_t needs the upstream g_t inside a [V x H] sum, so
      the forward keeps h, W, y and the N row maxima and sums, and backward recomputes each chunk's logits
      (the same matmul on the same shapes, so the same values): three matmuls, four with dW."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, form_dh):
        N, acc = hidden.shape[0], _acc_dtype(hidden.dtype)
        logp = torch.empty(N, dtype=acc, device=hidden.device)
        # the max and the sum, not one log-sum-exp: max + log(sum) rounds to ~6e-8 |max|, i.e. ~1e-6 of
        # 1 - p_y at |max| ~ 20, a tenth of it at p_y = 0.99999 (measured: 4.6 % dh error, not 3.9 %)
        rowmax = torch.empty(N, dtype=acc, device=hidden.device)
        rowsum = torch.empty(N, dtype=acc, device=hidden.device)
        dlogp_dh = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if form_dh else None
        ones = torch.ones(min(chunk_size, N), dtype=acc, device=hidden.device)
        buf = ChunkBuffers(min(chunk_size, N), weight)
        for s in range(0, N, chunk_size):
            sl = slice(s, s + chunk_size)
            logits = buf.logits(hidden[sl], weight)
            tgt = logits.gather(1, targets[sl, None]).squeeze(1)  # before the in-place exp overwrites it
            rowmax[sl], rowsum[sl] = _exp_shifted_(logits)
            logp[sl] = (tgt - rowmax[sl]) - rowsum[sl].log()
            if form_dh:  # g = 1: the one-hot is subtracted in fp32 before the bf16 cast, as in backward
                dlogp_dh[sl] = _chunk_grads_(logits, rowsum[sl], ones[: logits.shape[0]], None, targets[sl], weight, buf, None)
        if form_dh:
            ctx.save_for_backward(dlogp_dh)
        else:
            ctx.save_for_backward(hidden, weight, targets, rowmax, rowsum)
        ctx.chunk_size, ctx.form_dh, ctx.hidden_dtype = chunk_size, form_dh, hidden.dtype
        return logp

    @staticmethod
    def backward(ctx, grad):
        if ctx.form_dh:
            (dlogp_dh,) = ctx.saved_tensors
            return (grad.to(dlogp_dh.dtype)[:, None] * dlogp_dh).to(ctx.hidden_dtype), None, None, None, None
        hidden, weight, targets, rowmax, rowsum = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        N, c = hidden.shape[0], ctx.chunk_size
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_w else None
        buf = ChunkBuffers(min(c, N), weight)
        for s in range(0, N, c):
            sl = slice(s, s + c)
            h, g = hidden[sl], grad[sl].to(rowsum.dtype)
            e = buf.logits(h, weight).sub_(rowmax[sl, None]).exp_()  # exp(logits - max), recomputed in place
            dh_c = _chunk_grads_(e, rowsum[sl], g, h, targets[sl], weight, buf if need_h else None, dw)
            if need_h:
                dh[sl] = dh_c
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None


def fused_logprobs(hidden, weight, targets, chunk_size=None):
    """log p(targets) under logits = hidden @ weight^T without materializing [N x V] logits.
    hidden [N, H], weight [V, H] (the LM head), targets [N] int -> logp [N] fp32 (fp64 for fp64).
    chunk_size: tokens per chunk; 0 or None = auto_chunk for this head.
    With grad enabled, h requiring grad and the head frozen, the forward also forms dlogp/dh ([N x H]
    fp32 kept for backward, one more head-sized matmul); under no_grad (pi_old, pi_ref) it does not."""
    chunk_size = _check_kernel_inputs(hidden, weight, targets, chunk_size)
    # grad mode is read here: inside Function.forward it is always off
    form_dh = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    return FusedLogprobs.apply(hidden, weight, targets.long(), chunk_size, form_dh)  # gather wants int64


def _check_kernel_inputs(hidden, weight, targets, chunk_size):
    """Raises ValueError on bad shapes/dtypes; returns the chunk size to use (auto for 0/None)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int tensor of shape [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if not chunk_size:
        return auto_chunk(weight.shape[0], weight.device, weight.dtype)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 (or 0/None for auto), got {chunk_size}")
    return int(chunk_size)


def grpo_token_terms(logp, old_logp, ref_logp, adv, beta, eps):
    """Per-token GRPO pieces and their closed-form derivatives w.r.t. logp (used by the fused loss;
    losses.grpo_loss is the autograd version it is tested against).
    Returns pg, kl, dpg/dlogp, dkl/dlogp, clipped (bool), rho."""
    rho = torch.exp(logp - old_logp)
    pg = -torch.minimum(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)
    # the clipped branch is a constant in rho, so no gradient where it is the active minimum
    clipped = ((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps))
    dpg = torch.where(clipped, torch.zeros_like(rho), -adv * rho)
    d = ref_logp - logp
    e = torch.exp(d)
    return pg, e - d - 1, dpg, 1 - e, clipped, rho


class FusedGRPOLoss(torch.autograd.Function):
    """sum_t w_t l(logp_t): dloss/dlogp_t is known as soon as logp_t is, so the chunk's gradient is
    formed in the forward loop and only dh (and dW) are kept; backward just scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logp, ref_logp, adv, token_weight, kl_mask, beta, eps, chunk_size):
        need_h, need_w = ctx.needs_input_grad[:2]
        N, acc, c = hidden.shape[0], _acc_dtype(hidden.dtype), chunk_size
        cast = lambda x: x.detach().to(device=hidden.device, dtype=acc)
        old_logp, ref_logp, adv, w, km = map(cast, (old_logp, ref_logp, adv, token_weight, kl_mask))
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        sums = torch.zeros(6, dtype=acc, device=hidden.device)  # loss, pg, kl, clip_frac, ratio_mean, weight
        buf = ChunkBuffers(min(c, N), weight)
        for s in range(0, N, c):
            sl = slice(s, s + c)
            h, y = hidden[sl], targets[sl]
            e = buf.logits(h, weight)
            tgt = e.gather(1, y[:, None]).squeeze(1)
            rowmax, rowsum = _exp_shifted_(e)  # e = exp(logits - max), so softmax p = e / rowsum
            logp = (tgt - rowmax) - rowsum.log()
            pg, kl, dpg, dkl, clipped, rho = grpo_token_terms(logp, old_logp[sl], ref_logp[sl], adv[sl], beta, eps)
            wc = w[sl]
            sums += torch.stack([(wc * (pg + beta * km[sl] * kl)).sum(), (wc * pg).sum(), (wc * kl).sum(),
                                 (wc * clipped).sum(), (wc * rho).sum(), wc.sum()])
            g = wc * (dpg + beta * km[sl] * dkl)  # dloss/dlogp for this chunk
            dh_c = _chunk_grads_(e, rowsum, g, h, y, weight, buf if need_h else None, dw)
            if need_h:
                dh[sl] = dh_c
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        metrics = sums[1:].clone()
        ctx.mark_non_differentiable(metrics)
        return sums[0].clone(), metrics

    @staticmethod
    def backward(ctx, grad, _grad_metrics):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad.to(dh.dtype)
        dw = None if dw is None else (dw * grad.to(dw.dtype)).to(ctx.weight_dtype)
        return dh, dw, *([None] * 9)


def fused_grpo_loss(hidden, weight, targets, old_logp, ref_logp, adv, token_weight, kl_mask,
                    beta=0.1, eps=0.2, chunk_size=None):
    """GRPO + k3-KL loss sum_t w_t [pg_t + beta kl_mask_t kl_t] straight from hidden states (see
    ARCHITECTURE §7, §8). All per-token args are [N]: adv = the token's sequence advantage, token_weight
    = the aggregation weight (losses.token_weights), kl_mask = 1 where the KL applies.
    Returns (loss, metrics). Metrics are token_weight-weighted sums like the loss (so they add up
    across micro-batches): pg, kl (k3 over *all* tokens, whatever the mask), clip_frac, ratio_mean, and
    weight = sum_t w_t (ratio_mean / weight is the mean ratio, exactly 1 where every rho is 1).
    chunk_size: tokens per chunk; 0 or None = auto_chunk for this head."""
    chunk_size = _check_kernel_inputs(hidden, weight, targets, chunk_size)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("adv", adv),
                    ("token_weight", token_weight), ("kl_mask", kl_mask)):
        if x.shape != hidden.shape[:1]:
            raise ValueError(f"{name} must have shape [{hidden.shape[0]}], got {tuple(x.shape)}")
    loss, m = FusedGRPOLoss.apply(hidden, weight, targets.long(), old_logp, ref_logp, adv, token_weight, kl_mask,
                                  float(beta), float(eps), chunk_size)
    return loss, dict(zip(("pg", "kl", "clip_frac", "ratio_mean", "weight"), m.tolist()))
