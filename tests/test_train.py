"""sparsecore/train.py: the loop's result across a resume, divergence, the trainer's config
checks, training end to end with the sampled grow."""

import json
import time

import numpy as np
import pytest

from sparsecore.cli import main
from sparsecore.train import TrainConfig, Trainer, TrainingDiverged, build_model
from tests import cases
from tests.cases import mnist_cfg, mnist_subset


def test_resume_gives_the_same_result_as_not_stopping(tmp_path):
    data = mnist_subset(n_train=640, n_test=128)
    a = Trainer(mnist_cfg(tmp_path / "a", epochs=4), data)
    a.run()
    b = Trainer(mnist_cfg(tmp_path / "b", epochs=4), data)
    b.cfg.epochs = 2  # stop half way (a checkpoint is written every epoch)...
    b.run()
    c = Trainer(mnist_cfg(tmp_path / "b", epochs=4), data)  # ...and resume in a fresh process state
    with pytest.warns(UserWarning, match=r"resuming with different epochs \(2 -> 4\)"):
        c.load_checkpoint(tmp_path / "b" / "checkpoint.npz")
    assert c.step == b.step and c.epoch == 2
    c.run()
    for la, lc in zip(a.model.weighted(), c.model.weighted(), strict=True):
        np.testing.assert_array_equal(la.W.indices, lc.W.indices)
        np.testing.assert_array_equal(la.W.data, lc.W.data)
        np.testing.assert_array_equal(la.b, lc.b)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in c.history]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "test_acc" in json.loads(lines[-1])
    assert (tmp_path / "a" / "learning_curve.png").stat().st_size > 1000


def test_divergence_stops_with_a_message_and_keeps_the_checkpoint(tmp_path):
    data = mnist_subset(n_train=640, n_test=128)
    tr = Trainer(mnist_cfg(tmp_path, epochs=3, lr=0.05), data)
    tr.cfg.epochs = 1
    tr.run()
    good = (tmp_path / "checkpoint.npz").read_bytes()
    tr.cfg.epochs = 3
    tr.cfg.lr = 1e30
    with pytest.raises(
        TrainingDiverged, match=r"the loss became (nan|inf) at step \d+ .* last good checkpoint"
    ):
        tr.run()
    assert (tmp_path / "checkpoint.npz").read_bytes() == good
    with pytest.warns(UserWarning, match="resuming with different"):
        Trainer(mnist_cfg(tmp_path, epochs=3), data).load_checkpoint(tmp_path / "checkpoint.npz")


def test_divergence_on_the_last_step_of_an_epoch_is_not_saved(tmp_path):
    """The loss is checked before each step; a step that blows up the weights at the end of an
    epoch must still not reach the checkpoint."""
    data = mnist_subset(n_train=640, n_test=128)
    tr = Trainer(mnist_cfg(tmp_path, epochs=2, method="static"), data)
    tr.cfg.epochs = 1
    tr.run()
    good = (tmp_path / "checkpoint.npz").read_bytes()
    tr.cfg.epochs = 2
    last = 2 * tr.steps_per_epoch - 1
    real_lr = tr.lr
    tr.lr = lambda: 1e38 if tr.step == last else real_lr()
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 2 .* last good checkpoint"):
        tr.run()
    assert (tmp_path / "checkpoint.npz").read_bytes() == good


@pytest.mark.parametrize(
    "kw,msg",
    [
        (
            dict(sparsity=1.5),
            r"sparsity \(--sparsity\) must be a finite number in \(0, 1\), got 1.5",
        ),
        (
            dict(delta_t=0),
            r"delta_t \(--delta-t\) must be >= 1 \(ΔT, steps between topology updates\), got 0",
        ),
        (
            dict(method="magic"),
            r"method \(--method\) must be one of rigl, set, static, dense; got 'magic'",
        ),
        (dict(arch=[100, 10]), r"arch starts with 100 inputs but the dataset has 784 features"),
        (dict(arch=[784, 5]), r"arch ends with 5 outputs but the labels go up to 9"),
    ],
)
def test_bad_configs(kw, msg, tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    with pytest.raises(ValueError, match=msg):
        Trainer(mnist_cfg(tmp_path, **kw), data)


def test_training_with_sampled_grow_end_to_end(tmp_path, capsys):
    data = cases.mnist_subset(640, 128)
    cfg = dict(
        arch=[784, 64, 10],
        sparsity=0.9,
        delta_t=5,
        epochs=2,
        batch_size=64,
        lr=0.05,
        progress=False,
        grow="sampled",
        grow_candidates=4,
    )
    tr = Trainer(TrainConfig(out=str(tmp_path / "a"), **cfg), data)
    summary = tr.run()
    assert tr.updates and all(u["layers"][0]["grown"] > 0 for u in tr.updates[:2])
    assert summary["test_acc"] > 0.5
    assert tr.plan["grow"] == "sampled"
    # resume: grow is structural (like method), grow_candidates a result setting
    other = Trainer(TrainConfig(out=str(tmp_path / "b"), **{**cfg, "grow": "exact"}), data)
    with pytest.raises(ValueError, match=r"written with grow='sampled', this run has grow='exact'"):
        other.load_checkpoint(tmp_path / "a" / "checkpoint.npz")
    more = Trainer(TrainConfig(out=str(tmp_path / "c"), **{**cfg, "grow_candidates": 8}), data)
    with pytest.warns(UserWarning, match=r"grow_candidates \(4 -> 8\)"):
        more.load_checkpoint(tmp_path / "a" / "checkpoint.npz")
    with pytest.raises(ValueError, match="applies to method rigl"):
        TrainConfig(method="set", grow="sampled").validate()
    # the CLI
    argv = ["--arch", "784-1000000-1000000-10", "--sparsity", "0.99998", "--grow", "sampled"]
    assert main(["plan", *argv, "--grow-candidates", "20"]) == 0
    assert "sampled grow, 20 candidates" in capsys.readouterr().out


class _SlowUploads:
    """A stand-in for a device (arrays stay NumPy) whose uploads of the training set and of an
    epoch's permutation take 0.2 s each: what a large training set costs on a real GPU."""

    on_device = True
    xp = np

    def __init__(self, real):
        self.real, self.uploads = real, 0

    def asarray(self, a):
        a = np.asarray(a)
        if a.size >= 2048:
            self.uploads += 1
            time.sleep(0.2)
        return a

    def sync(self):
        pass

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_device_runs_step_time_excludes_the_uploads():
    """On a device the epoch's steps are timed as a whole (one sync at its end); the training
    set's upload (once per run) and the epoch's permutation (once per epoch) happen before that
    clock starts, so they are not charged to the steps."""
    from sparsecore import data as D

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 20)).astype(np.float32)
    y = rng.integers(0, 4, 2048)
    ds = D.Dataset("syn", x, y, x[:0], y[:0], x[:256], y[:256], 4)
    cfg = TrainConfig(arch=[20, 64, 4], sparsity=0.5, epochs=3, batch_size=64, progress=False)
    tr = Trainer(cfg, ds)
    tr.device = _SlowUploads(tr.device)
    tr.run()
    assert tr.device.uploads == 1 + 3 + 1  # the training set, 3 permutations, evaluation's set
    later = [r["time_per_step_s"] * 32 for r in tr.history[1:]]  # (epoch 1: the first compile)
    assert max(later) < 0.15, later  # an upload (0.2 s) charged to the steps would show


def test_a_second_run_reports_only_its_own_steps():
    data = cases.mnist_subset(n_train=256, n_test=64)
    tr = Trainer(TrainConfig(arch=[784, 32, 10], epochs=1, batch_size=64, progress=False), data)
    assert tr.run()["time_per_step_s"] > 0
    assert tr.run()["time_per_step_s"] is None  # nothing left to train: no step of its own


def test_build_model_refuses_the_old_communicator_argument():
    cfg = TrainConfig(arch=[8, 6, 3], sparsity=0.5).validate()
    with pytest.raises(TypeError, match="takes a layer builder, got object"):
        build_model(cfg, object())
