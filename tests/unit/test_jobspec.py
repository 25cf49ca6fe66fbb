"""Job specs are validated at submission, with errors that name the field."""

from __future__ import annotations

import os

import pytest

from resumer.core.decision import FailureClass
from resumer.core.errors import UsageError
from resumer.jobs import spec as jobspec

BASE = {"name": "mlp", "entrypoint": "resumer.examples_train:train_loop", "model": "resumer.examples:mlp_v1",
        "storage": {"root": "/tmp/x"}}


def test_repo_job_specs_parse() -> None:
    here = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")
    names = sorted(f for f in os.listdir(here) if f.endswith(".yaml"))
    assert names
    for name in names:
        spec = jobspec.load(os.path.join(here, name))
        assert spec.workers >= 1 and spec.root.startswith("/")


def test_defaults_and_budgets() -> None:
    spec = jobspec.parse({**BASE, "retries": {"hung": {"max": 1, "timeout_s": 30}, "crashed": {"max": 2}}})
    assert spec.workers == 2 and spec.every == 10 and spec.policy.value == "strict"
    assert spec.sharding == "none" and jobspec.parse({**BASE, "scaling": {"sharding": "fsdp"}}).sharding == "fsdp"
    assert spec.hang_timeout_s == 30 and spec.budgets[FailureClass.CRASHED].max_restarts == 2
    assert spec.budgets[FailureClass.HUNG].max_restarts == 1


@pytest.mark.parametrize(("patch", "message"), [
    ({"name": "bad name!"}, "Job spec field 'name'"),
    ({"entrypoint": "no_colon"}, "Job spec field 'entrypoint': must be MODULE:FUNCTION"),
    ({"storage": {}}, "Job spec field 'storage.root': is required"),
    ({"scaling": {"workers": 0}}, "Job spec field 'scaling.workers': must be an integer >= 1, got 0"),
    ({"scaling": {"gpus": 1}}, "Job spec field 'scaling.gpus': unknown field"),
    ({"scaling": {"sharding": "zero3"}}, "Job spec field 'scaling.sharding': must be one of none, fsdp, got 'zero3'"),
    ({"resume": {"policy": "lenient"}}, "Job spec field 'resume': Unknown policy 'lenient'"),
    ({"retries": {"crashed": {"timeout_s": 3}}}, "Job spec field 'retries.crashed.timeout_s': only 'hung'"),
    ({"checkpoint": {"every": "10"}}, "Job spec field 'checkpoint.every'"),
    ({"colour": "blue"}, "Job spec field 'colour': unknown field"),
])
def test_errors_name_the_field(patch: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        jobspec.parse({**BASE, **patch})
