"""Experiment trackers (``train.loggers``: MLflow, Weights & Biases): what a run sends them, and
how a resumed run, an evaluation or a report finds the same tracker run again.

``Trackers`` fans each call out to the backends on rank 0. A backend that raises (a server
down, a full disk) is reported in one warning and left out for the rest of the process:
training never dies for its logger, and ``metrics.jsonl`` (written by ``MetricsLogger``
first) loses nothing. Each backend's run id and the last step it was sent live in
``RUN/trackers.json``; a resumed run continues that run and sends no step it already sent (a
resume is bit-exact, so the metrics of those steps are the ones the tracker holds), and the
tracker's history equals ``metrics.jsonl``. TensorBoard is not here: ``MetricsLogger`` writes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from ibot.config import Config, TrainConfig, config_from_dict
from ibot.extras import require
from ibot.run_folder import RunFolder
from ibot.storage import atomic_write

logger = logging.getLogger(__name__)

# train.loggers entry -> (module to import, extra that installs it)
BACKENDS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def tracker_names(train: TrainConfig) -> list[str]:
    """The trackers of ``train.loggers`` that this module sends to (TensorBoard is not one)."""
    return [name for name in dict.fromkeys(train.loggers) if name in BACKENDS]  # each once


def require_trackers(train: TrainConfig) -> None:
    """One line naming the extra of a tracker in ``train.loggers`` that is not installed
    (checked at the start of a run, before its folder is written)."""
    for name in tracker_names(train):
        module, extra = BACKENDS[name]
        require(module, extra, f"train.loggers={name}")


class Backend(Protocol):
    """One tracker. ``start`` returns the run id to keep; every method may raise (see ``Trackers``)."""

    name: str

    def start(self, run_id: str | None, config: dict[str, Any], attach: bool) -> str: ...

    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...

    def log_file(self, path: Path, folder: str) -> None: ...

    def log_image(self, key: str, path: Path) -> None: ...

    def log_summary(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...

    def abandon(self) -> None:
        """Let go after a failure: release what it holds, without another call to a server that failed."""


class Trackers:
    """The run's trackers (none off rank 0 or without ``mlflow`` / ``wandb`` in ``train.loggers``)."""

    def __init__(self, run: RunFolder, backends: list[Backend], skip_through: dict[str, int]) -> None:
        self.run = run
        self.backends = backends
        self.skip_through = skip_through  # name -> the last step an earlier process sent
        self.state = _read_state(run)

    @classmethod
    def open(cls, run: RunFolder, cfg: Config, resumed: bool, is_main: bool = True) -> Trackers:
        """Start (or, ``resumed``, continue) the tracker runs of a pre-training run; log the config
        and ``config.yaml``. Rank 0 alone: the others get an empty fan-out."""
        if not is_main or not tracker_names(cfg.train):
            return cls(run, [], {})
        state = _read_state(run) if resumed else {}
        trackers = cls(run, [], {})
        trackers.state = dict(state)  # a new run starts new tracker runs
        config = cfg.to_dict()
        for name in tracker_names(cfg.train):
            kept = state.get(name, {})
            backend = _backend(name, run, cfg.train)
            started = trackers._guard(backend, lambda b=backend, k=kept: b.start(k.get("run_id"), config, False))
            if started is None:
                continue
            trackers.backends.append(backend)
            # -1: nothing sent yet (a k-NN monitor logs the untrained start at step 0)
            trackers.skip_through[name] = int(kept.get("last_step", -1)) if kept.get("run_id") == started else -1
            trackers.state[name] = {"run_id": started, "last_step": trackers.skip_through[name]}
        trackers._save_state()
        trackers.log_file(run.config)
        return trackers

    @classmethod
    def attach(cls, run: RunFolder) -> Trackers:
        """The trackers of a finished (or running) pre-training run, for a command that adds to it
        (an evaluation, the report, a picture): empty when the run has none. Never raises."""
        trackers = cls(run, [], {})
        try:
            if not run.config.is_file() or not trackers.state:
                return trackers
            train = config_from_dict(yaml.safe_load(run.config.read_text())).train
        except Exception as exc:  # a damaged config: its run's evaluation must still go on
            logger.warning("%s: no experiment tracker logging (%s)", run.config, _one_line(exc))
            return trackers
        config = {}
        for name in tracker_names(train):
            run_id = trackers.state.get(name, {}).get("run_id")
            if not run_id:
                continue
            module, extra = BACKENDS[name]
            try:
                require(module, extra, f"{run.root}: train.loggers={name}")
            except Exception as exc:
                logger.warning("%s; not logged there", exc)
                continue
            backend = _backend(name, run, train)
            if trackers._guard(backend, lambda b=backend, r=run_id: b.start(r, config, True)) is not None:
                trackers.backends.append(backend)
        return trackers

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Numeric ``values`` at ``step``, to each tracker that has not had this step yet."""
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        sent = False
        for backend in list(self.backends):
            if step <= self.skip_through.get(backend.name, -1) or not numbers:
                continue
            if self._guard(backend, lambda b=backend: b.log_metrics(step, numbers)) is not None:
                kept = self.state.setdefault(backend.name, {})
                kept["last_step"] = max(int(kept.get("last_step", -1)), step)
                sent = True
        if sent:
            self._save_state()

    def log_file(self, path: Path, folder: str = "") -> None:
        for backend in list(self.backends):
            self._guard(backend, lambda b=backend: b.log_file(path, folder))

    def log_image(self, key: str, path: Path) -> None:
        for backend in list(self.backends):
            self._guard(backend, lambda b=backend: b.log_image(key, path))

    def log_result(self, command: str, path: Path, result: dict[str, Any]) -> None:
        """An evaluation's JSON as a file, and its numbers (``eval/<command>/...``) at the run's last step."""
        self.log_file(path, "eval")
        numbers = {f"eval/{command}/{k}": v for k, v in flatten(result, "/").items()}
        step = max((int(s.get("last_step", 0)) for s in self.state.values()), default=0)
        step = max(step, 0)
        values = {k: float(v) for k, v in numbers.items() if _is_number(v)}
        for backend in list(self.backends):
            if values:
                self._guard(backend, lambda b=backend: b.log_summary(step, values))

    def close(self) -> None:
        """End the tracker runs; FAILED when an exception is on its way out (a ``finally`` block)."""
        failed = sys.exc_info()[0] is not None
        for backend in list(self.backends):
            self._guard(backend, lambda b=backend: b.close(failed))
        self.backends = []

    def _guard(self, backend: Backend, call: Any) -> Any:
        """``call()``; on an exception one warning, and the backend is left out from now on (None)."""
        try:
            result = call()
        except Exception as exc:
            logger.warning(
                "experiment tracker %s failed (%s); left out from now on (metrics.jsonl and the run "
                "folder lose nothing)",
                backend.name,
                _one_line(exc),
            )
            if backend in self.backends:
                self.backends.remove(backend)
            try:
                backend.abandon()
            except Exception:  # it has failed once: no second warning
                pass
            return None
        return result if result is not None else True

    def _save_state(self) -> None:
        if not self.state:
            return
        text = json.dumps(self.state, indent=2) + "\n"
        try:
            atomic_write(self.run.trackers, lambda tmp: Path(tmp).write_text(text))
        except OSError as exc:
            logger.warning("%s: cannot write (%s); a resume will start new tracker runs", self.run.trackers, exc)


def send_to_run(run: RunFolder, send: Callable[[Trackers], None]) -> None:
    """``send(trackers)`` when the run in ``run`` has experiment trackers (an evaluation's result,
    the report, a picture); nothing happens otherwise, and a failing tracker only warns."""
    trackers = Trackers.attach(run)
    if trackers.backends:
        send(trackers)
    trackers.close()


def _read_state(run: RunFolder) -> dict[str, dict[str, Any]]:
    """``RUN/trackers.json``: {tracker: {"run_id", "last_step"}}; {} when missing or unreadable."""
    try:
        state = json.loads(run.trackers.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def flatten(tree: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level: ``{"model": {"arch": ..}}`` -> ``{"model.arch": ..}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _backend(name: str, run: RunFolder, train: TrainConfig) -> Backend:
    return MLflowBackend(run, train) if name == "mlflow" else WandbBackend(run, train)


class MLflowBackend:
    """MLflow through ``MlflowClient`` (no global active run): params, metrics, artefacts."""

    name = "mlflow"
    PARAM_LENGTH = 6000  # mlflow's limit of a param value (MAX_PARAM_VAL_LENGTH in 2.x and 3.x)
    BATCH = 100  # params per log_batch call (mlflow's limit; 1000 metrics)

    def __init__(self, run: RunFolder, train: TrainConfig) -> None:
        self.run, self.train = run, train
        self.run_id = ""
        self.attached = False

    @property
    def uri(self) -> str:
        return self.train.mlflow_uri or f"sqlite:///{self.run.mlflow_db.resolve()}"

    def start(self, run_id: str | None, config: dict[str, Any], attach: bool) -> str:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.attached = attach
        if run_id:
            self.client.get_run(run_id)  # raises when the store does not hold it
            self.run_id = run_id
            if not attach:
                self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(
                self._experiment(), run_name=self.run.root.name, tags={"ibot.run_folder": str(self.run.root.resolve())}
            ).info.run_id
        if config:
            self._log_params(config)
        return self.run_id

    def _experiment(self) -> str:
        name = self.train.mlflow_experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # The default store lives in the run folder: its artefacts too (mlflow's default is ./mlruns).
        location = None if self.train.mlflow_uri else self.run.mlflow_artifacts.resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, config: dict[str, Any]) -> None:
        """The config flattened (``model.arch``); a resume adds only keys the run lacks (mlflow
        refuses to change a param; ``config.yaml`` as an artefact holds the resumed config)."""
        from mlflow.entities import Param

        have = set(self.client.get_run(self.run_id).data.params)
        params = [
            Param(key, _param_value(value, self.PARAM_LENGTH))
            for key, value in flatten(config).items()
            if key not in have
        ]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + self.BATCH])

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_file(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def log_image(self, key: str, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="pictures")

    def log_summary(self, step: int, values: dict[str, float]) -> None:
        self.log_metrics(step, values)

    def close(self, failed: bool) -> None:
        if self.run_id and not self.attached:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def abandon(self) -> None:
        self.run_id = ""  # the store failed: its run keeps the status it has


def _param_value(value: Any, limit: int) -> str:
    """A param as text (lists as JSON), cut to mlflow's length limit with a marker."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WandbBackend:
    """Weights & Biases: config, metrics, pictures as ``wandb.Image``; files under ``RUN/wandb``.
    ``train.wandb_mode=offline`` (the default) needs no account and touches no network;
    ``wandb sync RUN/wandb/offline-run-*`` uploads later."""

    name = "wandb"

    def __init__(self, run: RunFolder, train: TrainConfig) -> None:
        self.run, self.train = run, train
        self.handle: Any = None

    def start(self, run_id: str | None, config: dict[str, Any], attach: bool) -> str:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        if run_id:
            self._next_second(run_id)
        settings = wandb.Settings(
            mode=self.train.wandb_mode, silent=True, console="off", x_disable_stats=True, save_code=False
        )
        self.handle = wandb.init(
            project=self.train.wandb_project,
            id=run_id or None,
            resume="allow",
            dir=str(self.run.root),
            name=self.run.root.name,
            config=config or None,
            settings=settings,
            reinit="create_new",
        )
        return str(self.handle.id)

    def _next_second(self, run_id: str) -> None:
        """Wait while an attempt of this run id started in this second: wandb names its folder
        ``[offline-]run-YYYYmmdd_HHMMSS-ID`` (local time), and a second start in the same second
        would write into the first one's folder (a resume or an evaluation right after a run)."""
        for _ in range(15):
            stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
            if not any(self.run.wandb.glob(f"*run-{stamp}-{run_id}")):
                return
            time.sleep(0.1)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.handle.log(values, step=step)

    def log_file(self, path: Path, folder: str) -> None:
        if path.suffix == ".json":  # an evaluation: its numbers go to the summary (log_result)
            return
        base = self.run.root if self.run.contains(path) else path.parent  # report/x.png keeps its folder
        self.handle.save(str(path), base_path=str(base), policy="now")

    def log_image(self, key: str, path: Path) -> None:
        import wandb

        self.handle.log({f"pictures/{key}": wandb.Image(str(path))})

    def log_summary(self, step: int, values: dict[str, float]) -> None:
        self.handle.summary.update(values)  # a resumed online run refuses steps it has passed

    def close(self, failed: bool) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            handle.finish(exit_code=1 if failed else 0)

    def abandon(self) -> None:
        self.close(True)
