"""The pure core: signatures, plans, reconcile, renames, decisions, failure policy and the controller.

Nothing here does I/O or imports torch, Ray, MLflow or fsspec; import-linter keeps it so
(``[tool.importlinter]`` in pyproject.toml).
"""
