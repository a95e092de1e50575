"""The real stack, started once per test session: a local Ray cluster and the tiny test model."""

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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
