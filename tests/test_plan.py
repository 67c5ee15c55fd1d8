"""sparsecore/plan.py: the memory plan against the arrays a trainer allocates, --max-memory,
the sampled grow's and the fitted grow tile's bytes."""

import numpy as np
import pytest

from sparsecore.cli import main
from sparsecore.layers import SparseLinear
from sparsecore.plan import MIN_GROW_TILE_BYTES, describe_plan, memory_plan, parse_bytes
from sparsecore.train import MemoryBudgetExceeded, TrainConfig, Trainer, check_memory
from tests import cases
from tests.cases import mnist_cfg, mnist_subset


def test_memory_plan_matches_the_arrays_the_engine_allocates(tmp_path):
    """The plan's state bytes within 10% of the arrays a built trainer actually holds."""
    data = mnist_subset(n_train=256, n_test=64)
    for optimizer, method in (("sgd", "rigl"), ("adam", "static"), ("sgd", "dense")):
        tr = Trainer(
            mnist_cfg(tmp_path, optimizer=optimizer, method=method, arch=[784, 200, 50, 10]), data
        )
        held = 0
        for layer in tr.model.weighted():
            if isinstance(layer, SparseLinear):
                W = layer.W
                held += sum(
                    a.nbytes
                    for a in (
                        W.data,
                        W.indices,
                        W.indptr,
                        *W.transpose_structure(),
                        layer.gW,
                        layer._t_data,
                    )
                )
            else:
                held += layer.W.nbytes + layer.gW.nbytes
            held += layer.b.nbytes + layer.gb.nbytes
        held += sum(a.nbytes for st in tr.opt.state.values() for a in st.values())
        planned = tr.plan["state_bytes"]
        assert abs(planned - held) <= 0.1 * held, (optimizer, method, planned, held)
        assert tr.plan["dense_state_bytes"] >= planned


def test_max_memory_refuses_before_allocating(tmp_path, capsys):
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match=r"a memory size must look like 8GB"):
        parse_bytes("lots")
    with pytest.raises(
        MemoryBudgetExceeded, match=r"more than --max-memory .*\nmemory plan: 784-100000-10"
    ):
        Trainer(mnist_cfg(tmp_path, arch=[784, 100000, 10], sparsity=0.999, max_memory=10**6))
    rc = main(
        [
            "train",
            "--arch",
            "784-100000-100000-10",
            "--sparsity",
            "0.999",
            "--max-memory",
            "100MB",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "nothing was allocated" in capsys.readouterr().err
    assert main(["plan", "--arch", "784-100000-100000-10", "--sparsity", "0.999"]) == 0
    out = capsys.readouterr().out
    assert "transpose structure" in out and "dense equivalent" in out and "GiB" in out


def test_plan_counts_the_sampled_grow(tmp_path):
    arch = [784, 1_000_000, 1_000_000, 10]
    exact = memory_plan(arch, 0.99998, grow="exact")
    sampled = memory_plan(arch, 0.99998, grow="sampled", grow_candidates=10)
    more = memory_plan(arch, 0.99998, grow="sampled", grow_candidates=20)
    t = "topology update (transient)"
    assert sampled["pieces"][t] > exact["pieces"][t]  # candidates outweigh a 2 MiB tile here
    assert more["pieces"][t] > sampled["pieces"][t]
    assert sampled["state_bytes"] == exact["state_bytes"]
    with pytest.raises(ValueError, match="grow must be exact or sampled"):
        memory_plan(arch, 0.99998, grow="nope")


def test_exact_grow_tile_is_fitted_to_the_memory_budget(tmp_path):
    """--max-memory a little under the default plan: the exact grow gets a smaller tile (the
    plan then fits) instead of a refusal, and the grown topology is the same as with the
    default tile; far under it, the run is still refused."""
    base = dict(arch=[784, 4096, 4096, 10], sparsity=0.99, batch_size=32, progress=False)
    default = memory_plan(base["arch"], 0.99, batch_size=32)
    budget = default["total_bytes"] - (1 << 20)
    plan = check_memory(TrainConfig(max_memory=budget, **base))
    assert MIN_GROW_TILE_BYTES <= plan["grow_tile_bytes"] < 2 << 20
    assert default["total_bytes"] - (2 << 20) < plan["total_bytes"] <= budget
    with pytest.raises(MemoryBudgetExceeded):
        check_memory(TrainConfig(max_memory=default["total_bytes"] - (8 << 20), **base))
    assert check_memory(TrainConfig(max_memory=10**12, **base))["grow_tile_bytes"] is None
    # the fitted tile reaches the kernel, and the topology does not depend on it
    rng = np.random.default_rng(0)
    x = rng.random((784, 32), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    tops = []
    for max_memory in (None, budget):
        tr = Trainer(TrainConfig(max_memory=max_memory, out=str(tmp_path), **base), _tiny_data())
        assert tr.updater.tile_bytes == (None if max_memory is None else plan["grow_tile_bytes"])
        tr.model.backward(tr.loss_fn(tr.model.forward(x), y)[1])
        tr.updater.update(1, tr.model, tr.opt)
        tops.append([l.W.indices.copy() for l in tr.model.sparse_layers()])
    for a, b in zip(*tops, strict=True):
        np.testing.assert_array_equal(a, b)


def _tiny_data():
    return cases.mnist_subset(64, 32)


def test_describe_plan_names_every_piece_and_layer():
    plan = memory_plan([784, 300, 10], 0.9, grow="sampled", grow_candidates=4)
    text = describe_plan(plan)
    assert text.splitlines()[0] == (
        "memory plan: 784-300-10, rigl (sampled grow, 4 candidates per grown connection) at "
        "sparsity 0.9 (erk), batch 128, sgd"
    )
    for piece in plan["pieces"]:
        assert f"  {piece}" in text
    for l, row in enumerate(plan["layers"]):
        m, n = row["shape"]
        assert f"layer {l}: {m} x {n}, density {row['density']:.3g}, nnz {row['nnz']:,}" in text
    assert "total (peak)" in text and "dense equivalent (peak)" in text
