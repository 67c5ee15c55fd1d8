"""Streamed datasets: a folder of .npy files is memory-mapped and read per batch."""

import numpy as np
import pytest

from sparsecore import data as D
from sparsecore.train import TrainConfig, Trainer


def _folder(tmp_path, rng, n=300, shape=(4, 5), dtype=np.uint8):
    arrays = {
        "x_train": rng.integers(0, 255, (n, *shape)).astype(dtype),
        "y_train": rng.integers(0, 3, n),
        "x_test": rng.integers(0, 255, (40, *shape)).astype(dtype),
        "y_test": rng.integers(0, 3, 40),
    }
    for k, v in arrays.items():
        np.save(tmp_path / f"{k}.npy", v)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_streamed_rows_equal_the_in_memory_dataset(tmp_path, rng, val_fraction, dtype):
    arrays = _folder(tmp_path, rng, dtype=dtype)
    d = D.load(str(tmp_path), val_fraction=val_fraction, seed=3)
    ref = D.from_arrays(**arrays, val_fraction=val_fraction, seed=3)
    assert isinstance(d.x_train, D.StreamedRows) and isinstance(d.x_train.base, np.memmap)
    for a, b in ((d.x_train, ref.x_train), (d.x_val, ref.x_val), (d.x_test, ref.x_test)):
        assert a.shape == b.shape and a.nbytes == b.nbytes
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)
        idx = rng.permutation(b.shape[0])[:7]
        np.testing.assert_allclose(a[idx], b[idx], rtol=1e-5, atol=1e-5)  # a batch
        np.testing.assert_allclose(a[2:9], b[2:9], rtol=1e-5, atol=1e-5)  # a slice (evaluation)
        if b.shape[0]:
            np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)  # one row
    np.testing.assert_array_equal(d.y_train, ref.y_train)


def test_streamed_statistics_are_chunked_and_exact(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(D, "STREAM_CHUNK_BYTES", 8 * 20 * 7)  # 7 rows of 20 float64 per chunk
    arrays = _folder(tmp_path, rng, n=101, dtype=np.float32)
    d = D.load(str(tmp_path))
    x = arrays["x_train"].astype(np.float64)
    assert float(d.x_train.mean) == pytest.approx(x.mean(), rel=1e-6)
    assert float(d.x_train.std) == pytest.approx(x.std(), rel=1e-6)


def test_streamed_input_is_checked(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(D, "STREAM_CHUNK_BYTES", 8 * 20 * 7)
    arrays = _folder(tmp_path, rng, dtype=np.float32)
    arrays["x_train"][250, 1, 2] = np.nan
    np.save(tmp_path / "x_train.npy", arrays["x_train"])
    with pytest.raises(
        ValueError, match=r"x_train holds NaN or inf, or values beyond float32 \(rows 245\.\.251\)"
    ):
        D.load(str(tmp_path))
    big = np.zeros((300, 4, 5), np.float64)
    big[7, 0, 0] = 1e39  # finite in float64, inf once float32
    np.save(tmp_path / "x_train.npy", big)
    with pytest.raises(ValueError, match="x_train holds NaN or inf"):
        D.load(str(tmp_path))
    np.save(tmp_path / "x_train.npy", np.zeros((300,), np.float32))
    with pytest.raises(ValueError, match="at least 2 dims"):
        D.load(str(tmp_path))
    np.save(tmp_path / "x_train.npy", arrays["x_test"])
    with pytest.raises(ValueError, match="x_train has 40 rows but y_train has 300 labels"):
        D.load(str(tmp_path))


def test_training_streams_from_a_folder(tmp_path, rng):
    _folder(tmp_path, rng, n=256)
    d = D.load(str(tmp_path), val_fraction=0.25)
    cfg = TrainConfig(arch=[20, 16, 3], sparsity=0.5, epochs=2, batch_size=32, progress=False)
    tr = Trainer(cfg, d)
    summary = tr.run()
    assert np.isfinite(summary["test_acc"])
    assert tr.step == 2 * (192 // 32)


def test_bad_data():
    with pytest.raises(ValueError, match=r"x_train has 3 rows but y_train has 2 labels"):
        D.from_arrays(np.ones((3, 4)), [0, 1], np.ones((1, 4)), [0])
    with pytest.raises(ValueError, match=r"x_train holds NaN or inf"):
        D.from_arrays(np.full((2, 4), np.nan), [0, 1], np.ones((1, 4)), [0])
    with pytest.raises(ValueError, match=r"y_train holds a negative label"):
        D.from_arrays(np.ones((2, 4)), [0, -1], np.ones((1, 4)), [0])
    with pytest.raises(FileNotFoundError, match=r"not a bundled dataset"):
        D.load("no/such/file.npz")


def test_dataset_from_a_folder_of_npy_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.standard_normal((50, 6)),
        "y_train": rng.integers(0, 3, 50),
        "x_test": rng.standard_normal((10, 6)),
        "y_test": rng.integers(0, 3, 10),
    }
    for k, v in arrays.items():
        np.save(tmp_path / f"{k}.npy", v)
    d = D.load(str(tmp_path))
    ref = D.from_arrays(**arrays)
    np.testing.assert_allclose(np.asarray(d.x_train), ref.x_train, rtol=1e-6, atol=1e-6)
    assert d.n_classes == ref.n_classes and d.name == tmp_path.name
    (tmp_path / "y_test.npy").unlink()
    with pytest.raises(ValueError, match=r"lacks y_test.npy"):
        D.load(str(tmp_path))
