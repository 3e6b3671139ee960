"""--log tb|wandb: what the tracker mirrors (against a naive reading of the run's files), that the
packages are imported only when asked, and that a missing one stops the run before any work."""
import glob
import json
import sys
import types

import pytest

import tracking
import train
from jsonl import DataError


def write_run(run):
    """Two iterations' stats and update logs, as train.py leaves them."""
    logs = {0: [{"step": 1, "epoch": 0, "loss": 0.5, "pg": 0.4, "kl": None, "grad_norm": 1.0, "tokens_per_s": 9.0},
                {"step": 2, "epoch": 0, "loss": 0.3, "pg": 0.2, "kl": 0.01, "grad_norm": 0.8, "tokens_per_s": 8.0}],
            1: [{"step": 1, "epoch": 0, "loss": 0.1, "pg": 0.1, "kl": 0.02, "grad_norm": 0.5, "tokens_per_s": 7.0}]}
    for k, rows in logs.items():
        d = run / f"iter_{k}"
        d.mkdir(parents=True)
        stats = {"collect": {"rows": 8, "valid_fraction": 0.5, "mean_score": 0.25, "note": "text is left out"},
                 "curate": {"groups": 2 + k, "mean_group_std": 0.4},
                 "train": {"steps": len(rows), "sequences": 8}}
        (d / "stats.json").write_text(json.dumps(stats))
        (d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return logs


def naive(run, logs, k, phases):
    """What the tracker should send for iteration k, written out directly."""
    stats = json.loads((run / f"iter_{k}" / "stats.json").read_text())
    out = [(p, {key: v for key, v in stats[p].items() if isinstance(v, (int, float))}, "iteration", k)
           for p in phases if p in ("collect", "curate")]
    offset = sum(len(logs[j]) for j in range(k))
    if "train" in phases:
        out += [("train", {key: v for key, v in r.items() if key != "step" and v is not None}, "train/step",
                 offset + r["step"]) for r in logs[k]]
    return out


def test_tracker_mirrors_each_phase_that_ran_at_its_step(tmp_path):
    logs = write_run(tmp_path)
    sent = []
    t = tracking.Tracker(lambda *a: sent.append(a))
    t.iteration(tmp_path, 0, ["collect", "curate", "train"])
    t.iteration(tmp_path, 1, ["train"])  # collect and curate of iteration 1 ran in an earlier invocation
    t.evaluation(1, {"accuracy": 0.4, "ci_low": 0.3, "ci_high": 0.5, "valid": 0.9, "by_kind": {"a": 1}})
    assert sent == (naive(tmp_path, logs, 0, ["collect", "curate", "train"]) + naive(tmp_path, logs, 1, ["train"])
                    + [("eval", {"accuracy": 0.4, "ci_low": 0.3, "ci_high": 0.5, "valid": 0.9}, "checkpoint", 1)])
    assert [x for p, _, _, x in sent if p == "train"] == [1, 2, 3]  # iteration 1's step 1 comes after 0's two


def test_an_update_with_no_recorded_steps_before_it_is_an_error(tmp_path):
    write_run(tmp_path)
    (tmp_path / "iter_0" / "stats.json").write_text(json.dumps({"collect": {"rows": 8}}))
    with pytest.raises(DataError, match="iter_0.*stats.json"):
        tracking.Tracker(lambda *a: None).iteration(tmp_path, 1, ["train"])


def test_log_none_imports_and_sends_nothing(tmp_path):
    write_run(tmp_path)
    t = tracking.open_tracker(tmp_path, {"log": "none"})
    t.iteration(tmp_path, 0, ["collect", "train"])
    t.close()
    assert not (tmp_path / "tb").exists() and not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("backend, module", [("tb", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_stops_the_run_before_any_work(tmp_path, monkeypatch, capsys, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(SystemExit) as e:
        train.main(["--iter", "1", "--run", str(tmp_path / "run"), "--smoke", "--executor", "none", "--log", backend])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--log {backend}" in err and tracking.INSTALL[backend] in err
    assert not (tmp_path / "run" / "iter_0").exists()


def test_an_unknown_backend_is_refused_at_parsing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--run", str(tmp_path / "run"), "--log", "mlflow"])
    assert e.value.code == 2 and "--log" in capsys.readouterr().err


class FakeWandb(types.ModuleType):
    """Records the wandb calls the tracker makes (the real package is optional, and offline)."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        run = types.SimpleNamespace(define_metric=lambda name, **kw: self.calls.append(("define", name, kw)),
                                    log=lambda row: self.calls.append(("log", row)),
                                    finish=lambda: self.calls.append(("finish",)))
        return run


def test_wandb_gets_one_axis_per_prefix_offline_without_a_key(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    write_run(tmp_path)
    t = tracking.open_tracker(tmp_path, {"log": "wandb", "lr": 1e-4})
    t.iteration(tmp_path, 0, ["curate", "train"])
    t.evaluation(0, {"accuracy": 0.25})
    t.close()
    (_, init), *rest = fake.calls
    assert init["mode"] == "offline" and init["resume"] == "allow" and init["dir"] == str(tmp_path)
    assert init["id"] == (tmp_path / "wandb_id").read_text().strip()
    assert ("define", "train/*", {"step_metric": "train/step"}) in rest
    logs = [c[1] for c in rest if c[0] == "log"]
    assert logs[0] == {"curate/groups": 2, "curate/mean_group_std": 0.4, "iteration": 0}
    assert logs[1]["train/step"] == 1 and logs[2]["train/loss"] == 0.3 and logs[-1] == {"eval/accuracy": 0.25, "checkpoint": 0}
    assert rest[-1] == ("finish",)
    # a resumed run continues the same wandb run
    tracking.open_tracker(tmp_path, {"log": "wandb"}).close()
    assert [c[1]["id"] for c in fake.calls if c[0] == "init"] == [init["id"]] * 2


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="--log tb is optional: tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logs = write_run(tmp_path)
    t = tracking.open_tracker(tmp_path, {"log": "tb"})
    t.iteration(tmp_path, 0, ["collect", "train"])
    t.iteration(tmp_path, 1, ["train"])
    t.close()
    (events,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    # TensorBoard stores float32
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.5), (2, pytest.approx(0.3)), (3, pytest.approx(0.1))]
    assert [e.step for e in acc.Scalars("train/kl")] == [2, 3]  # the None of step 1 is left out
    assert [(e.step, e.value) for e in acc.Scalars("collect/valid_fraction")] == [(0, 0.5)]
    assert len(logs[0]) + len(logs[1]) == len(acc.Scalars("train/grad_norm"))
