"""pipelines.epoch_log: an epoch's metrics reach the MLflow run once across kills and resumes (fast, no Ray)."""

from __future__ import annotations

from pipelines.epoch_log import PAUSE_ENV, EpochLog, pause_after_log
from pipelines.tracking import client_for


def history(client, run_id: str, name: str = "train_loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def new_run(tmp_path):
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("e")
    return client, client.create_run(exp).info.run_id


def test_an_epoch_logged_by_a_killed_attempt_is_not_logged_again(tmp_path):
    """Attempt 1 logs epochs 1 and 2 and dies before Ray registered epoch 2's checkpoint; attempt 2
    resumes from epoch 1, trains 2 and 3 again: epoch 2 stays the first attempt's single value."""
    client, run = new_run(tmp_path)
    first = EpochLog(client, run)
    assert first.log(1, {"train_loss": 1.0}) and first.log(2, {"train_loss": 0.5})
    second = EpochLog(client, run)  # a new attempt reads the history once
    assert second.logged == {1, 2}
    assert not second.backfill(1, {"metrics": {"train_loss": 9.0}})  # the checkpoint's epoch is already there
    assert not second.log(2, {"train_loss": 0.5})
    assert second.log(3, {"train_loss": 0.25})
    assert history(client, run) == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_a_reported_epoch_killed_before_logging_is_logged_from_its_checkpoint_on_resume(tmp_path):
    client, run = new_run(tmp_path)
    EpochLog(client, run).log(1, {"train_loss": 1.0, "pgd2_acc": 0.1})
    resumed = EpochLog(client, run)  # epoch 2's checkpoint was reported, its metrics never logged
    assert resumed.backfill(2, {"metrics": {"train_loss": 0.5, "pgd2_acc": 0.2}, "run_name": "x"})
    assert not resumed.backfill(2, {"metrics": {"train_loss": 0.5}})  # once
    assert not resumed.backfill(3, {}) and not resumed.backfill(3, None)  # an old checkpoint without metrics
    assert history(client, run) == [(1, 1.0), (2, 0.5)]
    assert history(client, run, "pgd2_acc") == [(1, 0.1), (2, 0.2)]


def test_final_metrics_are_logged_once_and_ranks_without_a_client_log_nothing(tmp_path):
    client, run = new_run(tmp_path)
    log = EpochLog(client, run)
    assert log.log_final(2, {"acc_natural_transfer": 0.5, "replicas_in_sync": 1.0})
    assert not EpochLog(client, run).log_final(2, {"acc_natural_transfer": 0.7, "replicas_in_sync": 1.0})
    assert history(client, run, "acc_natural_transfer") == [(2, 0.5)]
    other_rank = EpochLog(None, None)
    assert not other_rank.log(1, {"train_loss": 1.0}) and not other_rank.log_final(2, {"x": 1.0})
    assert other_rank.logged == set()


def test_the_drill_pause_waits_only_where_the_epoch_was_first_logged():
    env = {PAUSE_ENV: "1:0.01, 3:0.02"}
    assert pause_after_log(1, True, env) == 0.01
    assert pause_after_log(3, True, env) == 0.02
    assert pause_after_log(3, False, env) == 0.0  # a retry that found epoch 3 logged: no pause
    assert pause_after_log(2, True, env) == 0.0 and pause_after_log(1, True, {}) == 0.0
