"""``import resumer`` is cheap: the public names load on first use, so the CLI's quick commands and the job board's
Ray actor start without importing torch; every public name still resolves."""

from __future__ import annotations

import subprocess
import sys

import resumer


def test_every_public_name_resolves_to_the_object_in_its_module() -> None:
    import importlib

    assert set(resumer.__all__) == set(resumer._EXPORTS)
    for name in resumer.__all__:
        module = importlib.import_module(resumer._EXPORTS[name])
        assert getattr(resumer, name) is getattr(module, name), name
    from resumer import CheckpointError, plan  # the from-import form too

    assert plan is resumer.runtime.api.plan and CheckpointError is resumer.core.errors.CheckpointError
    assert set(resumer.__all__) <= set(dir(resumer))


def test_type_checkers_see_the_same_names_from_the_same_modules() -> None:
    """The ``if TYPE_CHECKING:`` imports (what mypy and IDEs see) list exactly the lazy map's names and modules: a
    name added to one and not the other would type-check against one object and run with another, or not at all."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(resumer))
    blocks = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    assert len(blocks) == 1
    seen: dict[str, set[str]] = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.module is not None, ast.unparse(node)
        assert all(alias.asname is None for alias in node.names), ast.unparse(node)
        seen.setdefault(node.module, set()).update(alias.name for alias in node.names)
    assert seen == {module: set(names) for module, names in resumer._FROM.items()}


def test_an_unknown_name_is_an_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        resumer.no_such_name  # noqa: B018


def test_the_package_the_cli_and_the_job_board_import_without_torch() -> None:
    """A fresh interpreter (this one has torch loaded already): the CLI's entry and the board's module, which Ray
    imports in the board's actor process, leave torch unimported."""
    code = ("import sys, resumer, resumer.cli.main, resumer.jobs.board; "
            "print(sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
