"""The RigL scheduler under torch.distributed: 2 gloo processes on this machine, the model in
DistributedDataParallel, each rank taking its share of every batch (tests/torch_dist_worker.py).

After every update both ranks must hold the same topology, and it must be the topology of a
single process trained on the whole batches (same seeds): the grow follows the global batch's
gradient, gathered from the ranks. A negative control shows the comparison can fail: the grow
from rank 0's share alone differs from the global one. Data and seeds are drawn fresh each run
(tests/conftest.py's seed).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from torch.nn import functional as F  # noqa: E402

from tests import torch_dist_worker as W  # noqa: E402
from tests.conftest import SEED  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
TIMEOUT_S = 60  # the whole 2-process run, a hang included


def scenarios():
    seeds = np.random.default_rng([SEED, 0xD157]).integers(0, 2**31, 5)
    common = dict(delta_t=4, alpha=0.5, t_end=30, steps=32, group="world")
    return {
        # the recommended setting: no buffer broadcast, an even batch
        "sgd": dict(common, opt="sgd", batch=16, broadcast_buffers=False, seed=int(seeds[0])),
        # DDP's default (every buffer broadcast from rank 0 each forward), an odd batch (7 + 6)
        "adam-broadcast": dict(
            common, opt="adam", batch=13, broadcast_buffers=True, seed=int(seeds[1])
        ),
        "sgd-step-on-update": dict(
            common,
            opt="sgd",
            batch=10,
            broadcast_buffers=False,
            step_on_update=True,
            seed=int(seeds[2]),
        ),
        # RigL(process_group=None): "the default group when torch.distributed is initialised"
        "sgd-default-group": dict(
            common, opt="sgd", batch=16, broadcast_buffers=False, group=None, seed=int(seeds[3])
        ),
        # no DDP and a different model on each rank: the guard after the update must raise
        "guard": dict(
            common, opt="sgd", batch=8, broadcast_buffers=False, ddp=False, seed=int(seeds[4])
        ),
        "guard-default-group": dict(
            common,
            opt="sgd",
            batch=8,
            broadcast_buffers=False,
            ddp=False,
            group=None,
            seed=int(seeds[4]),
        ),
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp, scns):
    """Run the ranks; returns their results, or fails with their output (a hang: killed after
    TIMEOUT_S)."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        NUMBA_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
    )
    for attempt in range(3):
        cfg = dict(
            world=WORLD, port=free_port(), timeout=TIMEOUT_S - 20, out=str(tmp), scenarios=scns
        )
        path = tmp / "config.json"
        path.write_text(json.dumps(cfg))
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.torch_dist_worker", str(path), str(r)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(WORLD)
        ]
        outs = []
        deadline = time.monotonic() + TIMEOUT_S
        try:
            for p in procs:
                outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            for p in procs:
                p.communicate()
            pytest.fail(f"the {WORLD}-process run hung (killed after {TIMEOUT_S} s)")
        text = "\n".join(f"--- rank {r}\n{o}" for r, o in enumerate(outs))
        if all(p.returncode == 0 for p in procs):
            return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
        if "address already in use" not in text.lower() or attempt == 2:
            pytest.fail(f"a rank failed:\n{text[-6000:]}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    scns = scenarios()
    ranks = launch(tmp_path_factory.mktemp("dist"), scns)
    return scns, ranks


def same_topology(a, b):
    return all(
        torch.equal(ip_a, ip_b) and torch.equal(ix_a, ix_b)
        for (ip_a, ix_a), (ip_b, ix_b) in zip(a, b, strict=True)
    )


DDP_NAMES = [
    "sgd",
    "adam-broadcast",
    "sgd-step-on-update",
    "sgd-default-group",
]


@pytest.mark.parametrize("name", DDP_NAMES)
def test_ranks_share_one_topology(runs, name):
    _, ranks = runs
    r0, r1 = (r[name] for r in ranks)
    assert sorted(r0["topo"]) == sorted(r1["topo"]) == [4, 8, 12, 16, 20, 24, 28]
    assert r0["updates"] == r1["updates"] == 7
    for t in r0["topo"]:
        assert same_topology(r0["topo"][t], r1["topo"][t]), f"ranks differ after step {t}"
    for a, b in zip(r0["weights"], r1["weights"], strict=True):  # DDP: one model
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", DDP_NAMES)
def test_equals_single_process_on_the_whole_batch(runs, name):
    scns, ranks = runs
    ref = W.train(scns[name])  # one process, whole batches, no DDP
    r0, r1 = (r[name] for r in ranks)
    assert sorted(ref["topo"]) == sorted(r0["topo"])
    for t in ref["topo"]:
        assert same_topology(ref["topo"][t], r0["topo"][t]), f"differs after step {t}"
    # the global loss: the ranks' weighted losses average to the whole batch's mean
    glob = (np.array(r0["losses"]) + np.array(r1["losses"])) / WORLD
    np.testing.assert_allclose(glob, ref["losses"], rtol=2e-5)
    for a, b in zip(r0["weights"], ref["weights"], strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_negative_control_one_share_grows_elsewhere(runs):
    """At each update of the single-process reference, the same update on a copy of the model
    fed rank 0's share only: with the whole batch it reproduces the real update (so the
    copy is faithful), with the share alone it grows differently at least once."""
    scns, ranks = runs
    scn = scns["sgd"]
    alt = {}

    def control(t, model, rigl, x, y):
        for which, s in (("whole", slice(None)), ("share", W.share(x.shape[0], WORLD, 0))):
            m = W.build(scn["seed"] + 1)
            m.load_state_dict(model.state_dict())
            r = W.make_rigl(m, None, scn)
            r.load_state_dict(rigl.state_dict())
            F.cross_entropy(m(x[s]), y[s]).backward()
            r.step()
            alt[which, t] = W.topology(m)

    ref = W.train(scn, control=control)
    dist_topo = ranks[0]["sgd"]["topo"]
    differ = 0
    for t, topo in ref["topo"].items():
        assert same_topology(alt["whole", t], topo)
        assert same_topology(dist_topo[t], topo)
        differ += not same_topology(alt["share", t], topo)
    assert differ >= 1, "rank 0's share alone grew the global topology at every update"


@pytest.mark.parametrize("name", ["guard", "guard-default-group"])
def test_guard_raises_when_ranks_drift(runs, name):
    _, ranks = runs
    for r in ranks:
        err = r[name]["error"]
        assert err is not None, "ranks with different models updated without an error"
        assert "after the topology update of step 4 the ranks hold different patterns" in err
