"""Ray and MLflow around rna_core: the training, sweep and evaluation jobs, one stage per module.

Import the module you need; this package imports nothing on its own. The floors are
`jobs -> pipelines -> rna_core` (docs/architecture.md):

- `run_folder`: the base folder, local paths and URIs, job files (one atomic JSON write).
- `preflight`: every check that runs before Ray starts or an MLflow run is created.
- `cluster`: attach to a Ray cluster or start one; GPU detection.
- `tracking`: MLflow store resolution, one open-or-adopt-run helper, params, metrics, ends.
- `train` (the launcher) and `train_worker` (the per-worker Ray Train function);
  `checkpoints` (the run folder's checkpoint files); `model_card`.
- `sweep/`: spec, trial, summary, driver (Ray Tune).
- `evaluation/`: source, plan, store, tasks, job (the attack fan-out on Ray tasks).
"""
