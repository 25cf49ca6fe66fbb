"""Resume jobs on Ray: the job spec, the planner, the launcher, the board and the worker-side calls."""
