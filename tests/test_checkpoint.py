"""sparsecore/checkpoint.py: what a resume refuses. (The checkpoint's defences against damaged
or foreign files are numbered defects of tests/test_hardening.py.)"""

import numpy as np
import pytest

from sparsecore.checkpoint import CheckpointError
from sparsecore.train import Trainer
from tests.cases import mnist_cfg, mnist_subset


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    Trainer(mnist_cfg(tmp_path, epochs=1), data).run()
    other = Trainer(mnist_cfg(tmp_path / "o", arch=[784, 32, 10], epochs=1), data)
    with pytest.raises(
        ValueError, match=r"written with arch=\[784, 64, 10\], this run has arch=\[784, 32, 10\]"
    ):
        other.load_checkpoint(tmp_path / "checkpoint.npz")


def test_resume_refuses_a_different_structure(tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    Trainer(mnist_cfg(tmp_path, epochs=1), data).run()
    other = Trainer(mnist_cfg(tmp_path / "o", epochs=1, sparsity=0.8), data)
    with pytest.raises(ValueError, match=r"written with sparsity=0.9, this run has sparsity=0.8"):
        other.load_checkpoint(tmp_path / "checkpoint.npz")


def test_a_checkpoint_restores_model_optimizer_and_progress(tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    a = Trainer(mnist_cfg(tmp_path, epochs=1, optimizer="adam"), data)
    a.run()
    path = tmp_path / "again.npz"
    a.save_checkpoint(path)
    b = Trainer(mnist_cfg(tmp_path / "b", epochs=1, optimizer="adam"), data)
    b.load_checkpoint(path)
    assert (b.step, b.epoch, b.history) == (a.step, a.epoch, a.history)
    for la, lb in zip(a.model.weighted(), b.model.weighted(), strict=True):
        np.testing.assert_array_equal(la.W.indptr, lb.W.indptr)
        np.testing.assert_array_equal(la.W.indices, lb.W.indices)
        np.testing.assert_array_equal(la.W.data, lb.W.data)
        np.testing.assert_array_equal(la.b, lb.b)
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert set(sa) == set(sb) and int(sb["t"]) == a.opt.t > 0
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


def test_an_unreadable_checkpoint_is_one_checkpoint_error(tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    tr = Trainer(mnist_cfg(tmp_path, epochs=1), data)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*missing.npz"):
        tr.load_checkpoint(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(CheckpointError, match=r"text.npz is not a sparsecore checkpoint"):
        tr.load_checkpoint(tmp_path / "text.npz")
    assert tr.step == 0 and tr.epoch == 0  # the trainer is unchanged
