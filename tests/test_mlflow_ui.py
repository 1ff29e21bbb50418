"""The MLflow UI as a user sees it after the strategy sweep, read from the DOM headless Chromium renders.

One real run of configs/sweep_strategies.yaml, shrunk to seconds and pointed at a small Parquet
dataset this test writes (low-contrast synthetic images, so eps 8/255 moves the accuracies), on a
local Ray and a SQLite store; then `mlflow ui` on 127.0.0.1 and Debian's `chromium`. Screenshots
stay in test-output/mlflow-ui/ (or $RNA_TEST_OUTPUT/mlflow-ui/).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from helpers import low_contrast
from mlflow_ui import MlflowUI, chromium, render

from rna_core.data import make_synthetic, write_parquet_dataset

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = REPO / "configs" / "sweep_strategies.yaml"
SHRINK = [  # the preset's model, space, strategies and recipe; fewer images, steps and epochs
    "data.train_limit=0",
    "data.batch_size=64",
    "data.eval_batch_size=64",
    "data.eval_limit=48",
    "data.augment=false",
    "train.epochs=2",
    "train.attack.steps=1",
    "train.eval_pgd_steps=2",
    "train.lr=0.1",
    "train.schedule=constant",
    "sweep.metric=pgd2_acc",
    "ray.address=local",
    "mlflow.system_metrics_interval=1",
]
ROBUST = ("clean_acc", "pgd2_acc", "acc_natural_transfer", "acc_pgd20_steps2_transfer", "acc_eot_pgd_steps2_eot")
# The compare view renders its first ~17 metric rows (alphabetical; the table scrolls): the final accuracies,
# one draw and worst-of-10, come first.
COMPARED = (
    "acc_eot_pgd_steps2_eot",
    "acc_natural_transfer",
    "acc_natural_transfer_worst10",
    "acc_pgd20_steps2_transfer",
    "acc_pgd20_steps2_transfer_worst10",
)


def _text(dom: str) -> str:
    """The rendered text, cells separated by ' | ' (scripts and styles dropped)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"(\s*\|\s*)+", " | ", re.sub(r"<[^>]+>", " | ", dom))


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def compare_metrics(text: str, runs: int) -> dict[str, list[float | None]]:
    """The compare view's Metrics table: metric name -> one value per run, in the view's run order.

    The table renders its name column, then the values row by row."""
    part = text.split(" | Metrics | Show diff only | ", 1)[1].split(" | Artifacts | ", 1)[0]
    tokens = [t.strip() for t in part.split(" | ") if t.strip()]
    names = []
    while tokens and _number(tokens[0]) is None and tokens[0] != "-":
        names.append(tokens.pop(0))
    values = [_number(t) for t in tokens[: len(names) * runs]]
    return {n: values[i * runs : (i + 1) * runs] for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The shrunk strategy sweep, run once: its store, experiment, parent and child runs."""
    import ray

    if chromium() is None:
        pytest.fail("no chromium on PATH: apt-get install -y chromium (.ci/run installs it)")
    root = tmp_path_factory.mktemp("ui")
    data = root / "data"
    for split, n, seed in (("train", 256, 0), ("test", 64, 1)):
        ds = low_contrast(make_synthetic(n, seed=seed, split=split))
        write_parquet_dataset(data / f"{split}.parquet", ds.images, ds.labels, ds.classes, "cifar10")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("RNA_BASE_DIR", str(root))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mp.delenv("RAY_ADDRESS", raising=False)
    sys.path.insert(0, str(REPO))
    from pipelines import tracking
    from pipelines.sweep.driver import run_sweep
    from pipelines.sweep.spec import load_sweep_config

    cfg = load_sweep_config(str(STRATEGIES), [*SHRINK, f"data.data_dir={data}", f"ray.storage_path={root}/ray"])
    try:
        out = run_sweep(cfg, config_path=str(STRATEGIES), echo=lambda s: None)
    finally:
        ray.shutdown()
    client = tracking.client_for(out.parent.tracking_uri)
    children = client.search_runs(
        [out.parent.experiment_id],
        f"tags.`mlflow.parentRunId` = '{out.parent.run_id}'",
        order_by=["params.`train.sampling`"],
    )
    shots = Path(os.environ.get("RNA_TEST_OUTPUT") or REPO / "test-output") / "mlflow-ui"
    shots.mkdir(parents=True, exist_ok=True)
    with MlflowUI(out.parent.tracking_uri, root / "mlflow-ui.log") as ui:
        yield {"out": out, "client": client, "children": children, "ui": ui, "shots": shots, "root": root}
    mp.undo()


@pytest.mark.slow  # runs a 3-trial sweep on Ray, starts mlflow ui and a browser (~3 min on 2 cores)
@pytest.mark.timeout(900)  # the fixture's sweep counts too
def test_the_ui_opens_on_training_runs_models_and_a_compare_view_of_the_strategies(swept):
    from pipelines import mlflow_ui
    from pipelines.sweep.summary import SUMMARY_DIR

    out, client, ui, shots = swept["out"], swept["client"], swept["ui"], swept["shots"]
    children = swept["children"]
    exp_id = out.parent.experiment_id
    assert [c.data.params["train.sampling"] for c in children] == ["far:0.5", "shared", "uniform"]
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"

    # The experiment page (the address jobs print): model training's run list, not the GenAI overview.
    page = _text(render(mlflow_ui.experiment_url(ui.url, exp_id), shots / "experiment.png"))
    assert " | Model training | " in page and " | Run Name | " in page and " | Models | " in page
    assert "Detect Issues" not in page and "Token Usage" not in page
    assert f" | {out.name} | " in page and re.search(r" 4 \| matching runs", page)  # the parent, 3 children

    # The logged models, one per trial, ready, each from its trial's run.
    models = _text(
        render(f"{ui.url}/#/experiments/{exp_id}/models?workflowType=machine_learning", shots / "models.png")
    )
    assert models.count(" | model | Ready | ") == 3, models[:3000]
    for c in children:
        assert f" | {c.info.run_name} | " in models

    # The compare view of the three trials (the address jobs/sweep.py prints): runs and robust accuracies.
    ids = [c.info.run_id for c in children]
    view = _text(render(mlflow_ui.compare_url(ui.url, exp_id, ids), shots / "compare.png", size="1600,2600"))
    assert "Comparing 3 Runs from 1 Experiment" in view and all(i in view for i in ids)
    assert " | Parameters: | train.sampling | " in view or " | train.sampling | " in view
    shown = compare_metrics(view, len(ids))
    for name in COMPARED:
        logged = [c.data.metrics[name] for c in children]
        assert shown[name] == pytest.approx(logged, abs=6e-4), (name, shown.get(name), logged)
    assert any(len({round(v, 4) for v in shown[n]}) > 1 for n in COMPARED)  # the strategies differ somewhere
    assert all(any(n.startswith("system/") for n in c.data.metrics) for c in children)  # system metrics logged

    # The parent's summary lists the same accuracies, with the same values.
    board = Path(client.download_artifacts(out.parent.run_id, f"{SUMMARY_DIR}/leaderboard.md", str(swept["root"])))
    rows = [ln.split(" | ") for ln in board.read_text().splitlines() if ln.startswith("| ")]
    header = [h.strip("| ") for h in rows[0]]
    assert set(ROBUST) <= set(header) and compare_url_in(board.read_text(), ids)
    for row in rows[2:]:
        cells = dict(zip(header, (x.strip("| ") for x in row)))
        child = next(c for c in children if c.info.run_id == cells["mlflow_run_id"])
        for name in ROBUST:
            assert float(cells[name]) == pytest.approx(child.data.metrics[name], abs=5e-5)
    assert (Path(swept["shots"]) / "compare.png").stat().st_size > 20_000


def compare_url_in(text: str, ids: list[str]) -> bool:
    """The leaderboard names the compare view of exactly these runs."""
    found = re.search(r"#/compare-runs\?runs=(\S+?)&", text)
    return bool(found) and sorted(json.loads(unquote(found.group(1)))) == sorted(ids)
