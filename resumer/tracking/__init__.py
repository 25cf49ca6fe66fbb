"""Recording decisions and training in MLflow: the recorder, its spool, lineage and history."""
