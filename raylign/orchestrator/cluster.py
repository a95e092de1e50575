"""Start a local Ray cluster or attach to one (``ray.address``, or RAY_ADDRESS under ``ray job submit``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from raylign.config import RayConfig

# Environment every actor inherits: no telemetry, no hub access at run time.
ACTOR_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CONFIGURE_LOGGING": os.environ.get("VLLM_CONFIGURE_LOGGING", "0"),
    # Ray Train's controller polls each worker every 2 s by default; on a CPU worker every poll stalls the
    # training thread (measured: a 16 s fwd/bwd loop took 34 s at 2 s, 17 s at 10 s), so poll less often.
    # Worker death is still seen within this interval.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "10"),
}


def quiet_worker_logs() -> None:
    """Ray worker setup hook (every actor and task of the job runs it at process start).

    Ray Train's placement-group cleaner asks the State API every second whether the Train controller still
    lives; the State API is served by the dashboard, which a local cluster runs without, so every ask fails
    and logs a warning (about 240 lines in a 6-minute demo). The cleaner only acts once the controller has
    died, and then the run is over anyway. On a cluster with a dashboard the asks succeed and log nothing.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


@contextmanager
def ray_cluster(cfg: RayConfig) -> Iterator[dict]:
    """Yield cluster info; shut Ray down on exit only if this call started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        runtime_env = {"env_vars": ACTOR_ENV,
                       "worker_process_setup_hook": "raylign.orchestrator.cluster.quiet_worker_logs"}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # A local cluster stays on loopback: no port of it listens on another interface's address.
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, runtime_env=runtime_env,
                     log_to_driver=True, _node_ip_address="127.0.0.1")
        started = True
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "resources": ray.cluster_resources()}
    finally:
        if started:
            ray.shutdown()
