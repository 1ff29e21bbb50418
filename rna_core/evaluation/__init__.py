"""Evaluation of (randomized) models: protocols, result rows, paper-style tables, stability, paths.

    from rna_core.evaluation import evaluate_model, render_markdown, write_rows_parquet
    rows = evaluate_model(model, dataset, attacks=["fgsm", "pgd20"], protocols=["transfer", "eot"])
    write_rows_parquet(rows, "results.parquet"); print(render_markdown(rows))

Pure PyTorch (no Ray, no MLflow); a fan-out calls :func:`evaluate_batch` with :func:`batch_seed`.
"""

from .naming import CLEAN_METRIC, SCORES, pgd_metric, result_metric, score_metric
from .path_analysis import (
    DistanceRecord,
    TransferMatrix,
    accuracy_vs_distance,
    path_at_distance,
    save_distance_analysis,
    save_transfer_matrix,
    transfer_matrix,
)
from .protocols import (
    DEFAULT_EOT_ITER,
    DEFAULT_INFERENCE_DRAWS,
    PROTOCOLS,
    Counts,
    FirstFooled,
    LogitAverage,
    ProtocolOutcome,
    attack_generator,
    evaluate_attack,
    evaluate_batch,
    list_protocols,
    run_protocol,
    run_protocols,
    vote_correct,
)
from .results import (
    ResultRow,
    merge_rows,
    method_label,
    read_rows_parquet,
    rows_to_table,
    table_to_rows,
    write_rows_parquet,
)
from .runner import evaluate_model, make_batches
from .seeds import batch_seed, trial_seed, unit_seed
from .stability import StabilityStats, stability, stability_table
from .tables import EXTRA_COLUMNS, PAPER_COLUMNS, paper_table, paper_tables, render_markdown
from .training_metrics import (
    FINAL_INFERENCE_DRAWS,
    FINAL_SEED,
    Measure,
    epoch_measures,
    epoch_metric_names,
    evaluate_measures,
    final_measures,
    final_metric_names,
)

__all__ = [
    "CLEAN_METRIC",
    "Counts",
    "DEFAULT_INFERENCE_DRAWS",
    "FINAL_INFERENCE_DRAWS",
    "FINAL_SEED",
    "SCORES",
    "attack_generator",
    "score_metric",
    "vote_correct",
    "Measure",
    "epoch_measures",
    "epoch_metric_names",
    "evaluate_measures",
    "final_measures",
    "final_metric_names",
    "pgd_metric",
    "result_metric",
    "DEFAULT_EOT_ITER",
    "EXTRA_COLUMNS",
    "PAPER_COLUMNS",
    "PROTOCOLS",
    "DistanceRecord",
    "FirstFooled",
    "LogitAverage",
    "ProtocolOutcome",
    "ResultRow",
    "StabilityStats",
    "TransferMatrix",
    "accuracy_vs_distance",
    "batch_seed",
    "evaluate_attack",
    "evaluate_batch",
    "evaluate_model",
    "list_protocols",
    "make_batches",
    "method_label",
    "merge_rows",
    "paper_table",
    "paper_tables",
    "path_at_distance",
    "read_rows_parquet",
    "render_markdown",
    "rows_to_table",
    "run_protocol",
    "run_protocols",
    "save_distance_analysis",
    "save_transfer_matrix",
    "stability",
    "stability_table",
    "table_to_rows",
    "transfer_matrix",
    "trial_seed",
    "unit_seed",
    "write_rows_parquet",
]
