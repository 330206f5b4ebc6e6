"""Each built-in task builds, shards its data like one process would, and means what it says.

In one process, without a process group: the tasks themselves, not the launcher.
"""

from __future__ import annotations

import math
import socket
import sys
import textwrap

import pytest
import torch

from commlmo import ConfigError
from commlmo.runconfig import load_run_config
from commlmo.tasks import build_task, chargpt, custom, matrix, mnist1d


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run 10-100x slower on two intra-op threads of a 2-core machine than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ mnist1d


@pytest.fixture(scope="module")
def mnist1d_cnn():
    return mnist1d.Config(model="cnn")


def test_mnist1d_builds_the_published_split_and_both_models(mnist1d_cnn):
    task = build_task(mnist1d_cnn, global_batch=64)
    assert task.x.shape == (4000, 40) and task.x_test.shape == (1000, 40)
    assert set(task.y.tolist()) == set(range(10))
    x, y = task.train_batch(0)
    assert x.shape == (64, 40) and y.shape == (64,)
    loss, metrics = task.loss((x, y))
    assert loss.ndim == 0 and 0.0 <= metrics["acc"] <= 1.0
    assert math.isclose(task.evaluate()["loss"], math.log(10), rel_tol=0.1)  # untrained: about uniform
    mlp = build_task(mnist1d.Config(model="mlp", hidden=[32]), global_batch=64)
    assert mlp.model(x).shape == (64, 10)
    assert [p.shape for p in mlp.model.parameters()] == [(32, 40), (32,), (10, 32), (10,)]


def test_ranks_take_disjoint_slices_of_the_one_process_batch(mnist1d_cnn):
    one = build_task(mnist1d_cnn, global_batch=96, seed=3)
    ranks = [build_task(mnist1d_cnn, rank=r, world_size=3, global_batch=96, seed=3) for r in range(3)]
    for step in (0, 5, one.steps_per_epoch + 1):  # including the next epoch's reshuffle
        xs = torch.cat([t.train_batch(step)[0] for t in ranks])
        assert torch.equal(xs, one.train_batch(step)[0])
    # same seed -> same initial model on every rank
    for t in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(t.model.parameters(), ranks[0].model.parameters()))


def test_global_batch_must_split_evenly(mnist1d_cnn):
    with pytest.raises(ConfigError, match="does not split over 3 workers; use a multiple of 3"):
        build_task(mnist1d_cnn, rank=0, world_size=3, global_batch=100)


def test_mnist1d_dataset_is_generated_offline_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMLMO_CACHE_DIR", str(tmp_path))
    cfg = mnist1d.Config(samples=500, data_seed=7)
    path = mnist1d.prepare(cfg)
    assert path is not None and path.is_relative_to(tmp_path) and path.exists()
    task = build_task(cfg, global_batch=10)
    assert len(task.x) == 400 and len(task.x_test) == 100


# ------------------------------------------------------------------ matrix


def _kron_hessian(task):
    q = task.model
    return torch.kron(q.b.double(), q.a.double())  # Hessian of 1/2 vec(X)^T (B (x) A) vec(X), column-major vec


def test_matrix_task_has_the_stated_gradient_optimum_and_constants():
    cfg = matrix.Config(m=6, n=5)
    task = build_task(cfg, seed=1)
    q = task.model
    x = q.x[0]
    loss, metrics = task.loss(task.train_batch(0))
    loss.backward()
    torch.testing.assert_close(x.grad, q.a @ x.detach() @ q.b)
    assert metrics["loss"] == pytest.approx(float(loss.detach()))
    eig = torch.linalg.eigvalsh(_kron_hessian(task))
    assert task.info["L"] == pytest.approx(float(eig.max()), rel=1e-5)
    assert task.info["sigma"] == pytest.approx(float(eig.min()), rel=1e-4)
    with torch.no_grad():
        x.zero_()
    assert task.evaluate()["loss"] == 0.0 == task.info["f_star"]


@pytest.mark.parametrize("factor, converges", [(1.9, True), (2.1, False)])
def test_gradient_descent_is_stable_exactly_below_two_over_L(factor, converges):
    """The textbook check SignMuon's synthetic benchmark uses: SGD's stability edge is 2/L."""
    cfg = matrix.Config(m=8, n=8, spectrum="logspace", kappa=10.0)
    task = build_task(cfg, seed=0)
    assert task.info["L"] == pytest.approx(1.0) and task.info["kappa"] == pytest.approx(10.0)
    opt = torch.optim.SGD(task.model.parameters(), lr=factor / task.info["L"])
    f0 = task.evaluate()["loss"]
    for step in range(300):
        opt.zero_grad()
        task.loss(step)[0].backward()
        opt.step()
    f = task.evaluate()["loss"]
    assert (f < 1e-6 * f0) if converges else (f > f0)


def test_matrix_noise_is_per_rank_and_leaves_the_reported_loss_exact():
    cfg = matrix.Config(m=4, n=3, noise=0.5)
    grads = []
    for rank in range(2):
        task = build_task(cfg, rank=rank, world_size=2, seed=0)
        loss, metrics = task.loss(task.train_batch(0))
        loss.backward()
        grads.append(task.model.x[0].grad.clone())
        assert metrics["loss"] == pytest.approx(task.evaluate()["loss"])
    assert not torch.equal(grads[0], grads[1])


# ------------------------------------------------------------------ chargpt


def test_chargpt_default_corpus_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default corpus must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    cfg = chargpt.Config(max_chars=20_000, block=16, layers=1, width=32, heads=2, eval_batches=1)
    task = build_task(cfg, global_batch=8)
    assert "standard library" in task.info["corpus"] and task.info["characters"] == 20_000
    x, y = task.train_batch(0)
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    result = task.evaluate()
    assert result["loss"] == pytest.approx(task.info["uniform_loss"], rel=0.2)


def test_chargpt_learns_a_given_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("abcabcabd" * 400)
    cfg = chargpt.Config(corpus=str(tmp_path), block=8, layers=1, width=32, heads=2, eval_batches=1)
    task = build_task(cfg, global_batch=16, seed=0)
    assert task.info["vocab"] == 4
    opt = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    before = task.evaluate()["loss"]
    for step in range(60):
        opt.zero_grad()
        task.loss(task.train_batch(step))[0].backward()
        opt.step()
    assert task.evaluate()["loss"] < 0.5 * before


def test_chargpt_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        build_task(chargpt.Config(corpus=str(tmp_path / "nope.txt")))


# ------------------------------------------------------------------ custom


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from commlmo.tasks import Task

        def classify(*, seed, width=8):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(256, 4, generator=g)
            y = (x[:, 0] > 0).long()
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2)), {"x": x, "y": y}

        class Const(Task):
            def train_batch(self, step): return step
            def loss(self, batch): return self.model.weight.square().sum(), {}
            def evaluate(self): return {"loss": float(self.model.weight.square().sum())}

        def full(*, seed, rank, world_size):
            torch.manual_seed(seed)
            return Const(nn.Linear(3, 3, bias=False), info={"rank": rank, "world": world_size})

        def broken(*, seed):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("my_tasks",):
        sys.modules.pop(name, None)


def test_custom_module_function_returning_model_and_data(user_module):
    cfg = custom.Config(target="my_tasks:classify", options={"width": 16})
    task = build_task(cfg, rank=1, world_size=2, global_batch=32)
    assert task.has_accuracy and task.model[0].out_features == 16
    assert task.train_batch(0)[0].shape == (16, 4)
    assert "train set" in task.info["evaluated_on"]
    assert set(task.evaluate()) == {"loss", "acc"}


def test_custom_function_may_return_a_task_and_receive_its_rank(user_module):
    task = build_task(custom.Config(target="my_tasks:full"), rank=1, world_size=4)
    assert task.info == {"rank": 1, "world": 4}


@pytest.mark.parametrize("target, match", [
    ("no_such_module:fn", "cannot import module 'no_such_module'"),
    ("my_tasks:nothing", "has no attribute 'nothing'"),
    ("my_tasks:broken", "must return a commlmo Task or \\(model, data\\)"),
])
def test_custom_errors_name_the_target(user_module, target, match):
    with pytest.raises(ConfigError, match=match):
        build_task(custom.Config(target=target))


def test_custom_target_must_be_module_colon_function():
    with pytest.raises(ConfigError, match="task.target = 'my_tasks.fn': 'my_tasks.fn' is not of the form"):
        load_run_config({"task": {"kind": "custom", "target": "my_tasks.fn"}})
