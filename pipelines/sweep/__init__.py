"""Ray Tune sweeps of training runs, one stage per module (import the one you need).

- `spec`: read a sweep config (a training config plus its `sweep:` section) and check it
  against the training config before Ray starts; imports no Ray.
- `trial`: one Tune trial, a full training run as a nested MLflow run.
- `summary`: the trials table, leaderboard and plots logged on the sweep's parent run.
- `driver`: plan, resume, run the Tuner, reconcile the trials' runs (`run_sweep`).
"""
