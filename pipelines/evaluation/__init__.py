"""The attack-evaluation job, one stage per module (import the one you need).

- `source`: the model to evaluate (an MLflow training run's checkpoint, a checkpoint file, or a
  user's `module:factory` with a weights file), loaded and checked; writes nothing.
- `plan`: the options (`eval:` section) resolved against the model, the test rows, the units.
- `store`: the resumable result folder (one file per finished unit, the job file, the rows).
- `tasks`: the Ray tasks (a unit's counts; the path analysis), each fetching weights and data (and a
  user's zipped code) once per worker process, and their fan-out with progress.
- `job`: the missing units, the MLflow evaluation run, the tables (`run_evaluation`).

Why units. An evaluation is attacks x protocols x trials over the test set; a *unit* is one
(attack, protocol, trial, shard), a shard being a run of consecutive batches. A unit calls
`rna_core.evaluation.evaluate_batch` on each of its batches with the seed that the sequential
`evaluate_model` gives that batch (`batch_seed(trial_seed(seed, trial), batch index)`), so its
counts (one draw, worst-of-R, vote-of-R) are a pure function of (weights, shard, attack, protocol,
trial seed, R): the summed counts
equal the sequential run's exactly, whatever ran where, in which order, on how many workers.
"""
