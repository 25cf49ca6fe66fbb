"""Shared fixtures: a tiny deterministic model, a few steps of Adam + StepLR training, and checkpoint roots
on every cheap backend (a local folder and ``memory://``)."""

from __future__ import annotations

import copy
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pytest
import torch
from torch import nn

# Parallel runs (``pytest -n 2``, as CI runs the suite). Each test module goes to one worker as a whole, so a
# module's fixtures are made once. The modules that start a Ray cluster form one unit, run first and one after
# another on one worker, while the other worker takes the rest: two Ray clusters at once on a 2-core machine, each
# starting about seven processes per Ray Train launch, only slow each other down. (xdist's own ``--dist loadgroup``
# does not group under this pytest: it marks groups by rewriting node ids, which pytest 9.2 no longer reads back.)
RAY_MODULES = frozenset({"test_ray_job.py", "test_ray_sharded_job.py", "test_ray_jobs_api.py",
                         "test_format_ray_train.py"})
RAY_SCOPE = "modules that start Ray"


def _scope(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, or all the Ray modules together."""
    module = nodeid.split("::", 1)[0]
    return RAY_SCOPE if module.rsplit("/", 1)[-1] in RAY_MODULES else module


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduler over :func:`_scope`, in collection order (the Ray unit first: the longest), for the
    default distribution of ``-n``; another ``--dist`` given explicitly is left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    config.option.loadscopereorder = False
    return ModuleScopes(config, log)


@pytest.fixture(autouse=True)
def _ray_modules_listed(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that leaves Ray running in this process belongs to a module listed in ``RAY_MODULES``: an unlisted
    one would run beside the Ray unit in a parallel run (no monkeypatch here: a test's patched ``ray`` is restored
    before this looks)."""
    yield
    ray = sys.modules.get("ray")
    name = request.node.path.name
    if ray is not None and ray.is_initialized() and name not in RAY_MODULES:
        pytest.fail(f"{name} started Ray: add it to RAY_MODULES in tests/conftest.py, so that parallel runs keep "
                    "it on the worker that runs the Ray modules one after another")


@pytest.fixture(autouse=True)
def _wide_cli_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's consoles are 400 columns wide in every test. They are made once per process, when ``resumer.cli``
    is first imported, by whichever test that is (the order differs between a serial and a parallel run); Rich fixes
    a console's width then if COLUMNS is set, else reads it (80 without it) at each print. At 80 columns a table cell
    is cut ("starte") and a long message wraps, and a test reading them would pass or fail with the order."""
    common = sys.modules.get("resumer.cli.common")
    if common is None:
        monkeypatch.setenv("COLUMNS", "400")  # made during this test: 400 wide from then on
    else:
        for console in (common.out, common.err):
            monkeypatch.setattr(console, "_width", 400)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """On an xdist worker, the Ray modules first (in their order): the scheduler hands out units in this order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: _scope(item.nodeid) != RAY_SCOPE)


def _make_model(seed: int = 0) -> nn.Sequential:
    """Linear + BatchNorm1d + ReLU + Linear: parameters, float buffers and an int64 buffer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@dataclass
class Trainee:
    """A model with its optimizer and scheduler, as a training loop holds them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def _make_trainee(seed: int = 0, lr: float = 1e-2) -> Trainee:
    model = _make_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return Trainee(model=model, optimizer=optimizer, scheduler=scheduler)


def _train(t: Trainee, steps: int, data_seed: int = 1234) -> list[float]:
    """``steps`` deterministic steps (data from its own generator); returns the losses."""
    gen = torch.Generator().manual_seed(data_seed)
    t.model.train()
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        y = torch.randn(16, 3, generator=gen)
        loss = (t.model(x) - y).pow(2).mean()
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
        t.scheduler.step()
        losses.append(loss.item())
    return losses


def _trained(seed: int = 0, steps: int = 3) -> Trainee:
    t = _make_trainee(seed)
    _train(t, steps, data_seed=seed + 1000)
    return t


@dataclass
class Snapshot:
    """Everything a failed resume must leave as it was: model tensors, optimizer, scheduler, torch RNG."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: torch.Tensor


def _snapshot(t: Trainee) -> Snapshot:
    return Snapshot(
        model={k: v.detach().clone() for k, v in t.model.state_dict().items()},
        optimizer=copy.deepcopy(t.optimizer.state_dict()),
        scheduler=copy.deepcopy(t.scheduler.state_dict()),
        rng=torch.get_rng_state(),
    )


def _assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts / lists / tensors (tensors by torch.equal and dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, f"{where}: {a.dtype} != {b.dtype}"
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), where
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_unchanged(t: Trainee, before: Snapshot) -> None:
    after = _snapshot(t)
    _assert_same_tree(before.model, after.model, "model")
    _assert_same_tree(before.optimizer, after.optimizer, "optimizer")
    _assert_same_tree(before.scheduler, after.scheduler, "scheduler")
    assert torch.equal(before.rng, after.rng), "the torch RNG state changed"


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty checkpoint root URI (a str), on a local folder or on ``memory://``; removed afterwards."""
    if request.param == "local":
        yield str(tmp_path / "ckpts")
        return
    uri = f"memory://resumer-tests/{uuid.uuid4().hex}"
    yield uri
    fs = fsspec.filesystem("memory")
    if fs.exists(uri):
        fs.rm(uri, recursive=True)


@pytest.fixture
def fs_of() -> Callable[[str], tuple[Any, str]]:
    """(filesystem, path) of a URI, to read or damage checkpoint files directly."""
    return fsspec.core.url_to_fs


# The helpers above, as fixtures (tests take what they use as an argument instead of importing conftest).


@pytest.fixture
def make_model() -> Callable[..., nn.Sequential]:
    """``make_model(seed=0)``: the tiny model, initialised from ``seed``."""
    return _make_model


@pytest.fixture
def make_trainee() -> Callable[..., Trainee]:
    """``make_trainee(seed=0)``: an untrained model with Adam and StepLR."""
    return _make_trainee


@pytest.fixture
def train() -> Callable[..., list[float]]:
    """``train(trainee, steps, data_seed=1234)``: deterministic steps; returns the losses."""
    return _train


@pytest.fixture
def trained() -> Callable[..., Trainee]:
    """``trained(seed=0, steps=3)``: a trainee after a few steps (Adam state, decayed lr, BN stats)."""
    return _trained


@pytest.fixture
def snapshot() -> Callable[[Trainee], Snapshot]:
    """``snapshot(trainee)``: a deep copy of everything a refused resume must not touch."""
    return _snapshot


@pytest.fixture
def assert_unchanged() -> Callable[[Trainee, Snapshot], None]:
    """``assert_unchanged(trainee, snapshot)``: bitwise the same as when the snapshot was taken."""
    return _assert_unchanged


@pytest.fixture
def assert_same_tree() -> Callable[..., None]:
    """``assert_same_tree(a, b)``: nested dicts / lists / tensors are bitwise equal."""
    return _assert_same_tree
