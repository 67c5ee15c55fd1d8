"""sparsecore/checkpoint.py: what a resume refuses. (The checkpoint's defences against damaged
or foreign files are numbered defects of tests/test_hardening.py.)"""

import pytest

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
