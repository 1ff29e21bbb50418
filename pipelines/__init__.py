"""Ray and MLflow around rna_core: the Ray Train job, sweeps, the evaluation fan-out, tracking.

Modules (import the one you need; this package imports nothing heavy on its own):
- `pipelines.trainer`: the driver of a training job (`run_training`): validate, MLflow run,
  Ray Train `TorchTrainer`, final artifacts.
- `pipelines.train_loop`: the per-worker function (DDP over the rna_core epoch loop).
- `pipelines.tracking`: MLflow helpers (store resolution, one run per job, clean ends).
- `pipelines.model_card`: the Markdown card logged with every trained model.
- `pipelines.sweep`: Ray Tune sweeps (`run_sweep`): one Ray Train run per trial, nested MLflow runs, summary.
- `pipelines.evaluate`: the attack-evaluation fan-out (`evaluate`): units as Ray tasks, a resumable
  result folder, a nested MLflow evaluation run.
"""
