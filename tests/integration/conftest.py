"""The real stack, started once per test session: a local Ray cluster and the tiny test model."""

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Ray Train's controller polls its workers this often (raylign's default 10 s, for CPU training speed; Ray's own
# default is 2 s); a finished or failed worker group is seen at the next poll, so each trainer shutdown, restart
# and failed run waited up to 10 s for it. Set before raylign is imported (orchestrator/cluster.py reads it then);
# the session cluster, the `raylign` subprocesses and the job-submit head inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from raylign.config import RayConfig
    from raylign.orchestrator.cluster import ray_cluster

    with ray_cluster(RayConfig(num_cpus=8)) as info:
        yield info
    assert not ray.is_initialized()


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from raylign.config import ModelConfig
    from raylign.models import resolve_model

    return resolve_model(ModelConfig(name="tiny-random-llama"))


@pytest.fixture(scope="session")
def grpo_cli_run(tmp_path_factory) -> dict:
    """One `raylign train` of the GRPO preset as a user runs it: a subprocess in a working directory that is not
    the repository, relative paths, its own local Ray cluster, 3 steps on tiny-random-llama (HF generate).

    test_train_runs.py checks what it logs, test_cli_runs.py resumes and evaluates from the same folder (its
    weights are the reference for the killed-and-resumed run): one run where there were two."""
    import json

    from tests.integration.helpers import CLI_GRPO, PRESET, raylign_cli

    cwd = tmp_path_factory.mktemp("cli")
    proc = raylign_cli(cwd, "train", str(PRESET), *CLI_GRPO, "output_dir=runs/straight")
    run = cwd / "runs/straight"
    return {"cwd": cwd, "run": run, "summary": json.loads((run / "summary.json").read_text()), "stdout": proc.stdout}
