"""MLflow tracking: a local sqlite store by default, so `mlflow ui --backend-store-uri sqlite:///mlflow.db`
shows every run. Artifacts go to ./mlartifacts beside it unless the experiment already names a place."""

from __future__ import annotations

import os
from pathlib import Path

from raylign.config import Config, TrackingConfig, to_flat_params


class Tracker:
    """One MLflow run; a no-op when tracking is disabled."""

    def __init__(self, cfg: TrackingConfig, run_name: str, resume_run_id: str | None = None):
        self.cfg = cfg
        self.run_id: str | None = None
        if not cfg.enabled:
            return
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(cfg.uri)
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            location = Path("mlartifacts").absolute().as_uri() if cfg.uri.startswith("sqlite") else None
            experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.status_before: str | None = None  # a resumed run's status when this resume began
        if resume_run_id:  # a resumed training run keeps logging into the run it started
            self.status_before = mlflow.get_run(resume_run_id).info.status
            self.run_id = mlflow.start_run(run_id=resume_run_id).info.run_id
        else:
            self.run_id = mlflow.start_run(experiment_id=experiment_id, run_name=run_name).info.run_id

    def log_config(self, config: Config) -> None:
        if self.run_id:
            params = to_flat_params(config)
            self.mlflow.log_params({k: v[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if self.run_id:
            self.mlflow.log_artifact(str(path))

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        if self.run_id:
            self.mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.mlflow.end_run(status=status)

    def fail(self, error: BaseException) -> None:
        """End the run FAILED, with the error's first line as a tag. A resume of a run that had FINISHED leaves
        it FINISHED (its results stand; the failed continuation is only tagged); an interrupted one is FAILED."""
        if not self.run_id:
            return
        line = (str(error).splitlines() or [type(error).__name__])[0][:4000]
        tag = "raylign.resume_error" if self.status_before else "raylign.error"
        self.mlflow.set_tag(tag, f"{type(error).__name__}: {line}")
        self.close(status="FINISHED" if self.status_before == "FINISHED" else "FAILED")
