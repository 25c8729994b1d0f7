"""Experiment trackers (train.loggers): a real MLflow SQLite store and W&B offline runs, through a
kill and a resume; an unreachable server; a missing extra."""

from __future__ import annotations

import json
import logging
import struct
import sys
from collections import defaultdict
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from ibot import tracking
from ibot.cli import main
from ibot.config import Config, TrainConfig, load_config
from ibot.errors import ConfigError
from ibot.eval.monitor import KNNMonitor
from ibot.run_folder import RunFolder
from ibot.tracking import Trackers, WandbBackend, tracker_names
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import free_port, tiny_overrides

# Wall-clock figures: a resumed run measures them anew, every other value is bit-exact.
TIMINGS = {"images_per_second", "train_minutes", "data_wait_share"}


def _config(images: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [*tiny_overrides(images, out), "train.checkpoint_every=2", *extra])


def _monitored(images: Path, out: Path, *extra: str) -> Config:
    monitor = [f"eval.train_path={images}", f"eval.test_path={images}", "eval.monitor_k=3"]
    return _config(images, out, *monitor, "eval.monitor_every_steps=3", *extra)


def _with(cfg: Config, **fields: object) -> Config:
    return replace(cfg, train=replace(cfg.train, **fields))


def _killed_and_resumed(cfg: Config) -> Path:
    """Steps 1-3 logged (the k-NN monitor's too: steps 0, 3), killed after step 3's lines before its
    checkpoint; resumed from step 2 to 8 (the monitor at 3, 6, 8: the run's end)."""
    out = Path(cfg.train.output_dir)
    train(_with(cfg, max_steps=3), progress=False, monitor=KNNMonitor)
    (out / "checkpoint-00000003.pt").unlink()
    assert train(cfg, resume=True, progress=False, monitor=KNNMonitor).step == 8
    return out


def _history(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] of metrics.jsonl, in order."""
    found: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if key != "step":
                found[key].append((row["step"], float(value)))
    return dict(found)


def _same_history(sent: dict[str, list[tuple[int, float]]], out: Path, rows_per_step: bool = False) -> None:
    """The tracker's history equals metrics.jsonl step for step; values of the steps the resumed run
    re-trained (3) equal too, but for the wall-clock ones the tracker kept from the first run.
    ``rows_per_step``: the tracker keeps one row per step (W&B): a key logged twice at a step (the
    monitor's ``train_minutes`` after the step's own) holds the later value."""
    written = _history(read_metrics(out / "metrics.jsonl"))
    if rows_per_step:
        written = {key: list(dict(points).items()) for key, points in written.items()}
    assert sent.keys() == written.keys()
    for key, points in written.items():
        assert [s for s, _ in sent[key]] == [s for s, _ in points], key  # no step twice, none missing
        for (step, value), (_, got) in zip(points, sent[key]):
            if not (key in TIMINGS and step == 3):
                assert got == value, (key, step)
    assert [s for s, _ in written["loss"]] == list(range(1, 9))
    assert [s for s, _ in written["knn_top1"]] == [0, 3, 6, 8]


def test_mlflow_history_equals_metrics_through_a_kill_and_resume(image_folder: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    out = _killed_and_resumed(_monitored(image_folder, tmp_path / "run", "train.loggers=[mlflow]"))
    kept = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("ibot").experiment_id])) == 1  # resumed: same run
    run = client.get_run(kept["run_id"])
    sent = {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=_order)]
        for key in run.data.metrics
    }
    _same_history(sent, out)
    assert run.data.params["model.arch"] == "vit_pico" and run.data.params["data.batch_size"] == "4"
    assert json.loads(run.data.params["train.loggers"]) == ["mlflow"]
    assert run.info.status == "FINISHED"
    artefacts = [f.path for f in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artefacts
    assert (out / "mlflow-artifacts").is_dir()  # the default store keeps its artefacts in the run folder

    # An evaluation of the run adds its result to the same MLflow run.
    assert main(["eval", "knn", str(out), "--train-dir", str(image_folder), "--test-dir", str(image_folder)]) == 0
    assert [f.path for f in client.list_artifacts(run.info.run_id, "eval")] == ["eval/knn.json"]
    result = json.loads((out / "eval" / "knn.json").read_text())
    top1 = {k: v for k, v in client.get_run(run.info.run_id).data.metrics.items() if k.startswith("eval/knn/")}
    k = next(iter(result["knn"]))
    assert top1[f"eval/knn/knn/{k}/top1"] == pytest.approx(result["knn"][k]["top1"])
    # So does the report: the page with its figures, so that its links hold.
    assert main(["report", str(out)]) == 0
    assert "report.html" in [f.path for f in client.list_artifacts(run.info.run_id)]
    assert "report/losses.png" in [f.path for f in client.list_artifacts(run.info.run_id, "report")]


def _order(metric) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    return metric.step, metric.timestamp


def test_an_unreachable_tracking_server_warns_once_and_the_run_finishes(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = _config(image_folder, tmp_path / "run", "train.loggers=[mlflow]", f"train.mlflow_uri={uri}")
    with caplog.at_level(logging.WARNING, logger="ibot.tracking"):
        assert train(_with(cfg, max_steps=5), progress=False).step == 5
    warnings = [r for r in caplog.records if r.name == "ibot.tracking"]
    assert len(warnings) == 1 and "mlflow failed" in warnings[0].getMessage()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_a_tracker_that_fails_mid_run_warns_once_and_loses_nothing_from_metrics(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.tracking import MlflowClient

    real, calls = MlflowClient.log_batch, []

    def full_disk(self, run_id, metrics=(), **kw):  # type: ignore[no-untyped-def]
        calls.append(len(metrics))
        if metrics and len([c for c in calls if c]) > 2:  # steps 1 and 2 reach the store, then the disk is full
            raise OSError(28, "No space left on device")
        return real(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", full_disk)
    cfg = _config(image_folder, tmp_path / "run", "train.loggers=[mlflow]")
    with caplog.at_level(logging.WARNING, logger="ibot.tracking"):
        assert train(_with(cfg, max_steps=5), progress=False).step == 5
    warnings = [r for r in caplog.records if r.name == "ibot.tracking"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
    assert len([c for c in calls if c]) == 3  # left out after the failure: no retry at every step
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["last_step"] == 2


def _wandb_records(path: Path) -> list[tuple[str, object]]:
    """(kind, record) of a W&B transaction log (``run-ID.wandb``): a 7-byte header, then LevelDB-log
    framed protobuf records in 32 KiB blocks (wandb 0.31 ships no reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks, found = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            found.append((record.WhichOneof("record_type"), record))
            chunks = b""
    return found


def test_wandb_offline_keeps_config_summary_and_the_run_id_through_a_resume(image_folder: Path, tmp_path: Path) -> None:
    out = _killed_and_resumed(_monitored(image_folder, tmp_path / "run", "train.loggers=[wandb]"))
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["run_id"]
    logs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in logs)  # the resume kept the id
    sent: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for log in logs:
        records = _wandb_records(log)
        (run,) = [r.run for kind, r in records if kind == "run"]
        assert run.run_id == run_id
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["model"]["arch"] == "vit_pico"
        summary = {u.key or "/".join(u.nested_key) for k, r in records if k == "summary" for u in r.summary.update}
        assert "loss" in summary
        for kind, record in records:
            if kind == "history":
                row = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.history.item}
                for key, value in row.items():
                    if not key.startswith("_"):
                        sent[key].append((row["_step"], float(value)))
    _same_history(dict(sent), out, rows_per_step=True)

    # A picture drawn into the run goes to its W&B run as an image, under the same id.
    assert main(["visualize", "attention", str(out), "--images", str(image_folder), "--count", "2"]) == 0
    (added,) = set((out / "wandb").glob("offline-run-*/run-*.wandb")) - set(logs)
    assert added.name == f"run-{run_id}.wandb"
    image = {  # a logged dict comes as one item per field: nested_key [name, field]
        u.nested_key[1]: json.loads(u.value_json)
        for kind, r in _wandb_records(added)
        if kind == "history"
        for u in r.history.item
        if list(u.nested_key[:1]) == ["pictures/attention"]
    }
    assert image["_type"] == "image-file" and image["format"] == "png"
    assert (added.parent / "files" / image["path"]).is_file()

    # An evaluation's numbers go to the run's summary.
    assert main(["eval", "knn", str(out), "--train-dir", str(image_folder), "--test-dir", str(image_folder)]) == 0
    (evaluated,) = set((out / "wandb").glob("offline-run-*/run-*.wandb")) - set(logs) - {added}
    summary = {
        u.key: json.loads(u.value_json)
        for k, r in _wandb_records(evaluated)
        if k == "summary"
        for u in r.summary.update
    }
    result = json.loads((out / "eval" / "knn.json").read_text())["knn"]
    assert {key: summary[f"eval/knn/knn/{key}/top1"] for key in result} == pytest.approx(
        {key: row["top1"] for key, row in result.items()}
    )


def test_a_missing_extra_is_one_line_naming_it(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    for name in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
        out = tmp_path / f"run-{name}"
        args = ["pretrain", "--config", str(config), *tiny_overrides(image_folder, out), f"train.loggers=[{name}]"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"ibot: error: train.loggers={name} needs {name}: pip install 'ibot[{name}]'"
        assert not out.exists()  # checked before the run folder is written


def test_only_rank_0_tracks_and_unknown_loggers_are_refused(tmp_path: Path) -> None:
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "train.loggers=[mlflow,wandb]"])
    run = RunFolder(tmp_path / "run")
    assert Trackers.open(run, cfg, resumed=False, is_main=False).backends == []
    assert not run.root.exists()  # another rank writes nothing: no store, no trackers.json
    assert tracker_names(load_config(None, ["train.loggers=[mlflow,tensorboard,mlflow]"]).train) == ["mlflow"]
    with pytest.raises(ConfigError, match=r"^train.loggers: unknown \['neptune'\]"):
        load_config(None, ["train.loggers=[neptune]"])
    with pytest.raises(ConfigError, match=r"^train.wandb_mode: "):
        load_config(None, ["train.wandb_mode=cloud"])


def test_a_wandb_attempt_waits_for_a_folder_name_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # wandb names an attempt's folder by its start second: a second attempt of the id within that
    # second would write into the first one's folder.
    run = RunFolder(tmp_path)
    (run.wandb / "offline-run-20260101_000000-abc").mkdir(parents=True)
    stamps = [datetime(2026, 1, 1, 0, 0, 0)] * 3 + [datetime(2026, 1, 1, 0, 0, 1)]
    monkeypatch.setattr(tracking, "datetime", type("Clock", (), {"now": staticmethod(lambda: stamps.pop(0))}))
    slept: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", slept.append)
    WandbBackend(run, TrainConfig())._next_second("other")  # another id's folder: no wait
    assert not slept and len(stamps) == 3
    WandbBackend(run, TrainConfig())._next_second("abc")
    assert len(slept) == 2 and not stamps  # waited into the next second, then went on
