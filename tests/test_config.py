"""sparsecore/config.py: TrainConfig is the one source of a run's settings; the CLI's flags, the
memory plan and the checkpoint's resume check are derived from its declarations."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from sparsecore import checkpoint, cli, config
from sparsecore.config import TrainConfig
from sparsecore.plan import memory_plan


def _parser(fields, **overrides):
    p = argparse.ArgumentParser(exit_on_error=False)
    cli.add_settings(p, fields, **overrides)
    return p


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_every_setting_has_a_flag_with_the_fields_default_and_choices():
    p = _parser(config.fields())
    by_dest = {a.dest: a for a in p._actions}
    for f in config.fields():
        a = by_dest[f.name]
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # a switch that turns the default around
            assert a.option_strings == [flag if not f.default else f"--no-{flag[2:]}"]
            assert a.const is (not f.default)
        else:
            assert a.option_strings == [flag]
            assert a.choices == f.metadata["choices"]
        assert a.help.startswith(f.metadata["help"])
    args = p.parse_args([])
    got = {f.name: getattr(args, f.name) for f in config.fields()}
    want = {f.name: _default(f) for f in config.fields()}
    want["out"] = "runs/default"  # the one CLI default that differs from the API's (no files)
    assert got == want


def test_the_cli_config_equals_the_api_config_for_the_same_settings():
    argv = [
        "--arch", "20-12-3", "--sparsity", "0.8", "--method", "set", "--delta-t", "7",
        "--no-flush-denormals", "--nesterov", "--step-on-update", "--max-memory", "8MiB",
        "--grow-tile-bytes", "64KiB", "--shard-layers", "0,1", "--activation", "tanh",
        "--no-progress", "--out", "x", "--max-steps", "5",
    ]  # fmt: skip
    cfg = cli.settings_from(_parser(config.fields()).parse_args(argv), config.fields())
    assert (
        cfg
        == TrainConfig(
            arch=[20, 12, 3],
            sparsity=0.8,
            method="set",
            delta_t=7,
            flush_denormals=False,
            nesterov=True,
            step_on_update=True,
            max_memory=8 << 20,
            grow_tile_bytes=64 << 10,
            shard_layers=[0, 1],
            activation="tanh",
            progress=False,
            out="x",
            max_steps=5,
        ).validate()
    )
    # --shard-layers without a value: every sparse layer
    args = _parser(config.fields()).parse_args(["--shard-layers"])
    assert cli.settings_from(args, config.fields()).shard_layers == "all"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-memory", "8XB"], "--max-memory: a memory size must look like 8GB"),
        (["--arch", "784-x-10"], "--arch: layer sizes must look like 784-300-100-10"),
        (["--shard-layers", "a,b"], "--shard-layers: takes 'all' or weighted-layer indices"),
        (["--grow-tile-bytes", "0"], "--grow-tile-bytes: a memory size must be between"),
        (["--lr", "0"], r"lr \(--lr\) must be a finite number in \(0, ∞\)"),
    ],
)
def test_a_bad_value_names_its_flag(argv, message):
    args = _parser(config.fields()).parse_args(argv)
    with pytest.raises(ValueError, match=message):
        cli.settings_from(args, config.fields())


def test_the_plan_subcommand_takes_exactly_the_plan_fields():
    p = _parser(config.fields(plan=True), arch={"required": True})
    dests = {a.dest for a in p._actions} - {"help"}
    assert dests == set(config.names(plan=True))
    assert {"arch", "sparsity", "batch_size", "optimizer", "device", "grow"} <= dests
    with pytest.raises(SystemExit):
        p.parse_args([])  # --arch is required there


def test_the_plan_reads_the_plan_fields_and_nothing_else():
    base = TrainConfig(arch=[64, 48, 10], sparsity=0.8).validate()
    plan = memory_plan(base)
    assert plan == memory_plan([64, 48, 10], 0.8)  # the keyword form builds the same config
    others = {  # a different value of every setting the plan does not read
        "dataset": "other.npz",
        "delta_t": 3,
        "t_end": 0.5,
        "lr": 0.5,
        "nesterov": True,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
        "epochs": 2,
        "seed": 9,
        "val_fraction": 0.1,
        "activation": "tanh",
        "fan_in": "dense",
        "step_on_update": True,
        "max_steps": 3,
        "out": "o",
        "progress": False,
        "max_memory": 10**9,
        "flush_denormals": False,
        "rank_timeout": 5.0,
        "lr_step_every": 4,
        "lr_gamma": 0.5,
        "warmup_steps": 2,
    }
    assert set(others) | set(config.names(plan=True)) == set(config.names())
    assert memory_plan(dataclasses.replace(base, **others)) == plan
    changed = {  # and every plan setting it reads changes the plan
        "arch": [64, 96, 10],
        "sparsity": 0.5,
        "distribution": "uniform",
        "method": "static",
        "batch_size": 64,
        "optimizer": "adam",
        "momentum": 0.0,
        "alpha": 0.5,
        "device": "cuda",
        "grow_tile_bytes": 1 << 16,
    }
    for key, value in changed.items():
        assert memory_plan(dataclasses.replace(base, **{key: value})) != plan, key
    sampled = dataclasses.replace(base, grow="sampled")
    assert memory_plan(sampled) != plan
    assert memory_plan(dataclasses.replace(sampled, grow_candidates=3)) != memory_plan(sampled)
    with pytest.raises(TypeError, match="takes its settings from it"):
        memory_plan(base, batch_size=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch'"):
        memory_plan([64, 48, 10], 0.8, batch=3)


def test_the_checkpoint_check_uses_the_declared_roles():
    assert set(checkpoint.STRUCTURE_KEYS) == {
        "arch", "method", "grow", "optimizer", "sparsity", "distribution", "activation", "fan_in",
    }  # fmt: skip
    assert "seed" in checkpoint.RESULT_KEYS and "lr" in checkpoint.RESULT_KEYS
    assert "epochs" in checkpoint.RESULT_KEYS and "dataset" not in checkpoint.RESULT_KEYS
    assert not set(checkpoint.STRUCTURE_KEYS) & set(checkpoint.RESULT_KEYS)
    # fields added after the first checkpoints: what an old checkpoint without them had
    assert checkpoint.KEY_DEFAULTS == {
        "grow": "exact",
        "grow_candidates": 10,
        "flush_denormals": False,
        "dense_fallback": "off",
    }
    roles = {f.metadata["resume"] for f in config.fields()}
    assert roles == {config.STRUCTURE, config.RESULT, config.FREE}


def test_structure_and_result_settings_on_resume(tmp_path):
    cfg = TrainConfig(arch=[8, 6, 3], sparsity=0.5).validate()
    saved = dataclasses.asdict(cfg)
    checkpoint.check_config(saved, cfg, "p")  # the same: nothing said
    for key in checkpoint.STRUCTURE_KEYS:
        other = {**saved, key: "other"}
        with pytest.raises(checkpoint.CheckpointError, match=f"written with {key}='other'"):
            checkpoint.check_config(other, cfg, "p")
    with pytest.warns(UserWarning, match=r"resuming with different lr \(0.5 -> 0.1\)"):
        checkpoint.check_config({**saved, "lr": 0.5}, cfg, "p")
    free = {**saved, "dataset": "elsewhere.npz", "epochs": saved["epochs"]}
    checkpoint.check_config(free, cfg, "p")  # a free setting: silently different
    old = {k: v for k, v in saved.items() if k != "flush_denormals"}  # written before it existed
    with pytest.warns(UserWarning, match=r"flush_denormals \(False -> True\)"):
        checkpoint.check_config(old, cfg, "p")


def test_shapes_densities_and_sharded_layers():
    cfg = TrainConfig(arch=[784, 300, 100, 10], sparsity=0.9).validate()
    assert cfg.shapes() == [(300, 784), (100, 300), (10, 100)]
    assert len(cfg.densities()) == 3 and cfg.densities()[2] == 1.0  # ERK keeps the last dense
    dense = dataclasses.replace(cfg, method="dense", sparsity=0.0)
    assert dense.densities() == [1.0, 1.0, 1.0]
    assert dataclasses.replace(cfg, shard_layers="all").sharded_layers(2) == [0, 1]
    assert dataclasses.replace(cfg, shard_layers="all").sharded_layers(1) == []
    assert cfg.sharded_layers(4) == []  # shard_layers None


@pytest.mark.parametrize(
    "text, value",
    [("8GB", 8 * 10**9), ("512 MiB", 512 << 20), ("1e9", 10**9), ("12 KiB", 12 << 10)],
)
def test_parse_bytes(text, value):
    assert config.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0", "0.5B", "1e400", "inf", "nan", "-1", "8XB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="a memory size must"):
        config.parse_bytes(text)
