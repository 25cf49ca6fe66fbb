"""Job specs: the YAML a user submits, validated once at the edge with errors that name the field.

Example (``jobs/mlp.yaml``)::

    name: mlp
    entrypoint: resumer.examples_train:train_loop      # MODULE:FUNCTION(config) run on every worker
    model: resumer.examples:mlp_v1                     # no-argument factory (planning builds it on meta)
    optimizer: resumer.examples:adam                   # factory(model)
    scheduler: resumer.examples:step_lr                # factory(optimizer), optional
    config: {total_steps: 60}                          # passed to the entrypoint
    scaling: {workers: 2, use_gpu: false}              # sharding: fsdp shards the model (FSDP2) over them
    storage: {root: runs/mlp/checkpoints, options: {}}
    checkpoint: {every: 10, keep_last: 3, grace_s: 30}   # grace_s: time to write an emergency checkpoint
    resume: {policy: strict, renames: [auto]}          # from: PATH starts the job from any checkpoint
    retries: {crashed: {max: 5, backoff_s: 2}, preempted: {max: 20}, hung: {max: 2, timeout_s: 300}}
    mlflow: {tracking_uri: sqlite:///runs/mlflow.db, experiment: resumer}
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from resumer.core.decision import FailureClass
from resumer.core.errors import UsageError
from resumer.core.failures import Budget
from resumer.core.plan import Policy
from resumer.core.renames import parse_renames
from resumer.jobs.fields import SHARDING, Fields

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_TOP = {"name", "entrypoint", "model", "optimizer", "scheduler", "config", "scaling", "storage", "checkpoint",
        "resume", "retries", "mlflow"}


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    name: str
    entrypoint: str
    model: str
    optimizer: str | None = None
    scheduler: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    sharding: str = "none"  # "fsdp": resumer.jobs.worker.build() shards the model with FSDP2's fully_shard
    root: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    every: int = 10
    keep_last: int | None = None
    keep_every: int | None = None
    grace_s: float = 30.0  # after a preemption notice (SIGTERM): time for the emergency checkpoint
    policy: Policy = Policy.STRICT
    renames: tuple[str, ...] = ()
    start_from: str | None = None  # resume.from: any checkpoint (or root) to start from while the root holds none
    budgets: dict[FailureClass, Budget] = field(default_factory=dict)
    hang_timeout_s: float = 300.0
    tracking_uri: str | None = None
    experiment: str = "resumer"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for passing to workers and recording; storage options are left out (secrets)."""
        return {"name": self.name, "entrypoint": self.entrypoint, "model": self.model, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "config": self.config, "workers": self.workers,
                "use_gpu": self.use_gpu, "sharding": self.sharding, "root": self.root, "every": self.every,
                "policy": self.policy.value,
                "renames": list(self.renames), "start_from": self.start_from, "hang_timeout_s": self.hang_timeout_s}


_FIELDS = Fields("Job spec")
_err = _FIELDS.error


def _section(raw: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _err(key, f"must be a mapping, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise _err(f"{key}.{sorted(unknown)[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
    return value


def _location(path: str, base_dir: str) -> str:
    """A spec's path, relative to the spec file's directory unless it is absolute or a URI."""
    if "://" not in path and not os.path.isabs(path):
        return os.path.normpath(os.path.join(base_dir, path))
    return path


def _ref(value: Any, name: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _REF.match(value):
        raise _err(name, f"must be MODULE:FUNCTION (e.g. 'mypkg.train:main'), got {value!r}")
    return value


def _budgets(raw: dict[str, Any]) -> tuple[dict[FailureClass, Budget], float]:
    retries = _section(raw, "retries", {"preempted", "crashed", "hung"})
    from resumer.core.failures import DEFAULT_BUDGETS

    budgets = dict(DEFAULT_BUDGETS)
    timeout = 300.0
    for cls_name, value in retries.items():
        where = f"retries.{cls_name}"
        sub = _section(retries, cls_name, {"max", "backoff_s", "max_backoff_s", "timeout_s"})
        cls = FailureClass(cls_name)
        base = budgets[cls]
        budgets[cls] = Budget(max_restarts=_FIELDS.integer(sub.get("max", base.max_restarts), f"{where}.max",
                                                           minimum=0),
                              backoff_s=_FIELDS.number(sub.get("backoff_s", base.backoff_s), f"{where}.backoff_s"),
                              max_backoff_s=_FIELDS.number(sub.get("max_backoff_s", base.max_backoff_s),
                                                    f"{where}.max_backoff_s"))
        if "timeout_s" in sub:
            if cls is not FailureClass.HUNG:
                raise _err(f"{where}.timeout_s", "only 'hung' has a timeout")
            timeout = _FIELDS.number(sub["timeout_s"], f"{where}.timeout_s")
        del value
    return budgets, timeout


def parse(raw: Any, *, base_dir: str = ".") -> JobSpec:
    """Validate a job spec (already loaded from YAML); every error names its field."""
    if not isinstance(raw, dict):
        raise UsageError("A job spec must be a YAML mapping with at least: name, entrypoint, model, storage.root.")
    unknown = set(raw) - _TOP
    if unknown:
        raise _err(sorted(unknown)[0], f"unknown field (allowed: {', '.join(sorted(_TOP))})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err("name", f"must be letters, digits, '.', '_' or '-' (1-101 chars), got {name!r}")
    scaling = _section(raw, "scaling", {"workers", "use_gpu", "resources_per_worker", "sharding"})
    storage = _section(raw, "storage", {"root", "options"})
    ckpt = _section(raw, "checkpoint", {"every", "keep_last", "keep_every", "grace_s"})
    resume = _section(raw, "resume", {"policy", "renames", "from"})
    mlflow = _section(raw, "mlflow", {"tracking_uri", "experiment"})
    root = storage.get("root")
    if not isinstance(root, str) or not root:
        raise _err("storage.root", "is required: a local path or an fsspec URI (s3://bucket/prefix)")
    root = _location(root, base_dir)
    start_from = resume.get("from")
    if start_from is not None:
        if not isinstance(start_from, str) or not start_from:
            raise _err("resume.from", "must be the path or URI of a checkpoint (any format resumer reads) or of "
                                      f"a root of checkpoints, got {start_from!r}")
        start_from = _location(start_from, base_dir)
        if start_from.rstrip("/") == root.rstrip("/"):
            raise _err("resume.from", "is the job's own storage.root, which the job resumes from anyway: "
                                      "leave 'from' out")
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise _err("config", "must be a mapping")
    renames = resume.get("renames") or []
    if isinstance(renames, str):
        renames = [renames]
    try:
        parse_renames(list(renames))
        policy = Policy.parse(resume.get("policy", "strict"))
    except UsageError as exc:
        raise _err("resume", str(exc)) from None
    use_gpu = scaling.get("use_gpu", False)
    if not isinstance(use_gpu, bool):
        raise _err("scaling.use_gpu", f"must be true or false, got {use_gpu!r}")
    budgets, timeout = _budgets(raw)
    return JobSpec(
        name=name, entrypoint=_ref(raw.get("entrypoint"), "entrypoint") or "",
        model=_ref(raw.get("model"), "model") or "", optimizer=_ref(raw.get("optimizer"), "optimizer", True),
        scheduler=_ref(raw.get("scheduler"), "scheduler", True), config=config,
        workers=_FIELDS.integer(scaling.get("workers", 2), "scaling.workers"), use_gpu=use_gpu,
        resources_per_worker=dict(scaling.get("resources_per_worker") or {}),
        sharding=_FIELDS.choice(scaling.get("sharding", "none"), "scaling.sharding", SHARDING),
        root=root, storage_options=dict(storage.get("options") or {}),
        every=_FIELDS.integer(ckpt.get("every", 10), "checkpoint.every"),
        keep_last=_FIELDS.optional_integer(ckpt.get("keep_last"), "checkpoint.keep_last"),
        keep_every=_FIELDS.optional_integer(ckpt.get("keep_every"), "checkpoint.keep_every"),
        grace_s=_FIELDS.number(ckpt.get("grace_s", 30.0), "checkpoint.grace_s"),
        policy=policy, renames=tuple(str(r) for r in renames), start_from=start_from,
        budgets=budgets, hang_timeout_s=timeout,
        tracking_uri=mlflow.get("tracking_uri"), experiment=str(mlflow.get("experiment", "resumer")))


def load(path: str) -> JobSpec:
    """Read and validate a job spec file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"No job spec at {path}.") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}") from None
    return parse(raw, base_dir=os.path.dirname(os.path.abspath(path)))
