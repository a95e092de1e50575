"""MLflow status on failure: a fresh run that fails is FAILED; a resume that fails leaves a finished run FINISHED."""

from mlflow.tracking import MlflowClient

from raylign.config import TrackingConfig
from raylign.orchestrator.tracking import Tracker


def test_a_failed_resume_leaves_the_finished_run_finished(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t")
    first = Tracker(cfg, run_name="demo")
    first.log_metrics({"reward/mean": 0.5}, step=1)
    first.close()
    resumed = Tracker(cfg, run_name="demo", resume_run_id=first.run_id)
    assert resumed.run_id == first.run_id and resumed.status_before == "FINISHED"
    resumed.fail(FileNotFoundError("trainer checkpoint runs/demo/checkpoints/step-000016: missing files\ntraceback"))
    run = MlflowClient(cfg.uri).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["raylign.resume_error"] == ("FileNotFoundError: trainer checkpoint "
                                                     "runs/demo/checkpoints/step-000016: missing files")
    assert run.data.metrics["reward/mean"] == 0.5

    fresh = Tracker(cfg, run_name="other")
    fresh.fail(RuntimeError("trainer workers failed"))
    run = MlflowClient(cfg.uri).get_run(fresh.run_id)
    assert run.info.status == "FAILED" and run.data.tags["raylign.error"] == "RuntimeError: trainer workers failed"
