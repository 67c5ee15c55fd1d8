"""sparsecore/cli.py: `sparsecore train | plan | info` from the command line."""

import json

import numba
import numpy as np
import pytest
import scipy

import sparsecore
from sparsecore.cli import main
from sparsecore.config import TrainConfig
from sparsecore.plan import describe_plan, memory_plan
from tests.cases import blobs_npz, cli_error


def test_user_npz_and_cli(tmp_path, capsys):
    p = blobs_npz(tmp_path / "toy.npz")
    rc = main(
        [
            "train",
            "--dataset",
            str(p),
            "--arch",
            "20-32-3",
            "--sparsity",
            "0.5",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--delta-t",
            "5",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    acc = float(out.strip().splitlines()[-1].split(":")[1].strip().rstrip("%"))
    assert acc > 90.0  # three well-separated blobs
    assert "FLOPs/step" in out and "training state" in out
    rc = main(
        [
            "train",
            "--dataset",
            str(p),
            "--arch",
            "20-32-3",
            "--sparsity",
            "2",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert (
        rc == 2
        and "sparsity (--sparsity) must be a finite number in (0, 1), got 2.0"
        in capsys.readouterr().err
    )


def test_cli_lr_schedules_and_bad_resume(tmp_path, capsys):
    rng = np.random.default_rng(0)
    p = tmp_path / "toy.npz"
    np.savez(
        p,
        x_train=rng.standard_normal((200, 20)),
        y_train=rng.integers(0, 3, 200),
        x_test=rng.standard_normal((50, 20)),
        y_test=rng.integers(0, 3, 50),
    )
    base = [
        "train",
        "--dataset",
        str(p),
        "--arch",
        "20-32-3",
        "--sparsity",
        "0.5",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--no-progress",
    ]
    assert main([*base, "--lr-schedule", "step", "--out", str(tmp_path / "a")]) == 2
    assert "needs lr_step_every > 0" in capsys.readouterr().err
    assert (
        main([*base, "--lr-schedule", "step", "--lr-step-every", "3", "--out", str(tmp_path / "b")])
        == 0
    )
    capsys.readouterr()
    assert main([*base, "--resume", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert (
        "error" in capsys.readouterr().err
    )  # a folder is not a checkpoint: an error, not a traceback


def test_cli_train_with_the_sampled_grow(tmp_path, capsys):
    p = blobs_npz(tmp_path / "toy.npz")
    argv = ["train", "--dataset", str(p), "--arch", "20-32-3", "--sparsity", "0.5"]
    argv += ["--epochs", "3", "--batch-size", "32", "--delta-t", "5", "--no-progress"]
    rc = main([*argv, "--grow", "sampled", "--grow-candidates", "3", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0
    assert float(out.strip().splitlines()[-1].split(":")[1].strip().rstrip("%")) > 90.0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["grow"] == "sampled" and cfg["grow_candidates"] == 3
    rc = main([*argv, "--method", "set", "--grow", "sampled", "--out", str(tmp_path / "s")])
    assert rc == 2 and "applies to method rigl" in capsys.readouterr().err


def test_info_prints_the_versions_and_the_threading_setup(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"sparsecore", "numpy", "scipy", "numba", "threads"}
    assert info["sparsecore"] == sparsecore.__version__ and info["numpy"] == np.__version__
    assert info["numba"] == numba.__version__ and info["scipy"] == scipy.__version__
    assert set(info["threads"]) == set(sparsecore.threading_info())  # (the layer: once started)


def test_plan_json_is_the_memory_plan_of_the_flags(capsys):
    argv = ["--arch", "784-300-10", "--sparsity", "0.9", "--batch-size", "32"]
    assert main(["plan", *argv, "--optimizer", "adam", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    want = memory_plan(
        TrainConfig(arch=[784, 300, 10], sparsity=0.9, batch_size=32, optimizer="adam")
    )
    assert plan == json.loads(json.dumps(want))
    assert plan["arch"] == [784, 300, 10] and plan["optimizer"] == "adam" and plan["ranks"] == 1
    assert [row["shape"] for row in plan["layers"]] == [[300, 784], [10, 300]]
    assert plan["total_bytes"] == sum(plan["pieces"].values()) < plan["dense_total_bytes"]
    # without --json: the same plan as text
    assert main(["plan", *argv, "--optimizer", "adam"]) == 0
    assert capsys.readouterr().out.strip() == describe_plan(want)


def test_plan_ranks_are_checked(capsys):
    argv = ["plan", "--arch", "784-300-10", "--sparsity", "0.9"]
    assert "--ranks must be >= 1, got 0" in cli_error(capsys, *argv, "--ranks", "0")
    assert "--ranks plans one rank of sharded layers: add --shard-layers" in cli_error(
        capsys, *argv, "--ranks", "2"
    )


def test_a_user_error_is_a_traceback_under_sparsecore_debug(capsys, monkeypatch):
    argv = ["plan", "--arch", "784-300-10", "--sparsity", "2"]
    assert "sparsity (--sparsity) must be a finite number in (0, 1), got 2.0" in cli_error(
        capsys, *argv
    )
    monkeypatch.setenv("SPARSECORE_DEBUG", "1")
    with pytest.raises(ValueError, match=r"sparsity \(--sparsity\) must be a finite number"):
        main(argv)
