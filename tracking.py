"""Experiment logging to the dashboards researchers already use: `--log tb` (TensorBoard) or
`--log wandb` (Weights & Biases); off by default (`--log none`), and neither package is imported
unless asked for, nor listed in requirements.txt.

    pip install tensorboard && python train.py --iter 3 --log tb
    tensorboard --logdir runs/default/tb
    pip install wandb && WANDB_MODE=offline python train.py --iter 3 --log wandb
    wandb sync runs/default/wandb/offline-run-*       # later, from a machine that can reach wandb

The JSONL files stay the record; this mirrors them, phase by phase, as the driver finishes each:
    train/<key>    every row of iter_<k>/train_log.jsonl (loss, pg, kl, clip_frac, ratio, grad_norm,
                   lr, tokens_per_s), against `train/step`: update steps counted across iterations
    collect/<key>  iter_<k>/stats.json's collect numbers (valid_fraction, mean_score, executor
    curate/<key>   tokens, ...) and curate numbers (groups, mean_group_std, ...), against `iteration`
                   (refine/<key> for --mode refine's collect)
    eval/<key>     each evaluated checkpoint's summary (accuracy, ci_low, ci_high, valid, tokens and
                   calls per problem), against `checkpoint`
Only numbers go out (a non-numeric or missing value is left out). A phase that an earlier
invocation finished was mirrored then, so a resumed run does not send it twice.

wandb runs offline unless WANDB_MODE says otherwise or an API key is at hand (WANDB_API_KEY or a
~/.netrc entry for api.wandb.ai): a run must never stop to ask for a login. The wandb run id is
kept in runs/<run>/wandb_id, so a resumed run continues the same wandb run.
"""
import math
import netrc
import os
import uuid
from pathlib import Path

from config import KNOBS
from jsonl import DataError, read_json, read_jsonl

BACKENDS = KNOBS["log"][1]
INSTALL = {"tb": "pip install tensorboard", "wandb": "pip install wandb"}


def numbers(values):
    """The finite numeric entries of a dict (bools as 0/1): what a dashboard can plot."""
    out = {}
    for k, v in values.items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = v
    return out


class Tracker:
    """Mirrors a run's numbers to one sink: sink(prefix, values, axis, x) sends `values` (a dict of
    numbers) under `prefix/`, at x on the named axis. open_tracker builds the TensorBoard and wandb
    sinks (None for --log none: nothing is read or sent); a test can pass a list's append."""

    def __init__(self, sink=None, close=None):
        self.sink, self._close = sink, close

    def send(self, prefix, values, axis, x):
        values = numbers(values)
        if values and self.sink:
            self.sink(prefix, values, axis, x)

    def iteration(self, run_dir, k, phases):
        """Iteration k's phases that ran in this invocation ("collect" or W4S's "refine", "curate",
        "train"): their stats.json numbers, and every update step of iter_<k>/train_log.jsonl at its
        step counted across iterations."""
        if not self.sink:
            return
        iter_dir = Path(run_dir) / f"iter_{k}"
        stats = read_json(iter_dir / "stats.json", {})
        for phase in phases:
            if phase != "train" and phase in stats:
                self.send(phase, stats[phase], "iteration", k)
        if "train" in phases and (iter_dir / "train_log.jsonl").is_file():
            before = self.update_steps_before(run_dir, k)
            for row in read_jsonl(iter_dir / "train_log.jsonl"):
                self.send("train", {key: v for key, v in row.items() if key != "step"}, "train/step", before + row["step"])

    def update_steps_before(self, run_dir, k):
        """Update steps of iterations 0..k-1, from their stats.json (the train step records them)."""
        total = 0
        for j in range(k):
            steps = read_json(Path(run_dir) / f"iter_{j}" / "stats.json", {}).get("train", {}).get("steps")
            if steps is None:
                raise DataError(f"{Path(run_dir) / f'iter_{j}' / 'stats.json'}: no train steps recorded; "
                                f"iteration {k}'s update steps cannot be placed after it")
            total += steps
        return total

    def evaluation(self, k, summary):
        """Checkpoint k's held-out summary (evaluate.eval_generator's or refine's)."""
        self.send("eval", summary, "checkpoint", k)

    def close(self):
        if self._close:
            self._close()


def _tensorboard(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise DataError(f"--log tb needs the tensorboard package ({e}); install it with: {INSTALL['tb']}") from None
    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def sink(prefix, values, axis, x):
        for key, v in values.items():
            writer.add_scalar(f"{prefix}/{key}", v, global_step=x)
        writer.flush()  # a dashboard open during the run sees each phase as it ends
    return sink, writer.close


def _has_wandb_key():
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb(run_dir, cfg):
    try:
        import wandb
    except ImportError as e:
        raise DataError(f"--log wandb needs the wandb package ({e}); install it with: {INSTALL['wandb']}") from None
    id_file = Path(run_dir) / "wandb_id"
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12])
    mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "spogw"), name=Path(run_dir).name,
                     id=id_file.read_text().strip(), resume="allow", dir=str(run_dir), config=cfg, mode=mode)
    defined = set()

    def sink(prefix, values, axis, x):
        # each prefix has its own x axis (update step, iteration, checkpoint), so no explicit wandb
        # step: wandb drops a row whose step is below one already logged, and checkpoints come last
        if prefix not in defined:
            run.define_metric(axis)
            run.define_metric(f"{prefix}/*", step_metric=axis)
            defined.add(prefix)
        run.log({**{f"{prefix}/{key}": v for key, v in values.items()}, axis: x})
    return sink, run.finish


def open_tracker(run_dir, cfg):
    """The tracker --log asks for (one that sends nothing for --log none)."""
    backend = cfg.get("log", "none")
    if backend == "none":
        return Tracker()
    if backend == "tb":
        return Tracker(*_tensorboard(run_dir))
    if backend == "wandb":
        return Tracker(*_wandb(run_dir, cfg))
    raise DataError(f"--log must be one of {', '.join(BACKENDS)}, got {backend!r}")
