"""The calls a training loop makes inside a Ray Train worker: ``build``, ``restore``, ``save``, ``report``.

The public name for them; they live in ``resumer.jobs.worker`` with the rest of the job machinery.
"""

from resumer.jobs.worker import attempt_config, build, plan_hash, rank, report, restore, save

__all__ = ["attempt_config", "build", "plan_hash", "rank", "report", "restore", "save"]
