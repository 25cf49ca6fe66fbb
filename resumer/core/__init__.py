"""The pure core: signatures, plans, reconcile, renames, decisions, failure policy and the controller.

Nothing here does I/O or imports Ray, MLflow or fsspec; ``import-linter`` (``.importlinter``) keeps it so.
"""
