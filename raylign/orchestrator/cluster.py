"""Start a local Ray cluster or attach to one (``ray.address``, or RAY_ADDRESS under ``ray job submit``).

A local cluster listens on loopback only (see ``ray_cluster``); an attached one is left as it was started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray._private import ray_constants

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
def _cluster_mode_off() -> Iterator[None]:
    """Ray's single-machine mode (its macOS/Windows default) while ray.init starts the local cluster.

    ray.init swaps a loopback ``_node_ip_address`` for the machine's routable address (worker.py:1844,
    services.py:799-801) unless ``ray_constants.ENABLE_RAY_CLUSTER`` is off (services.py:815-819). That flag
    comes from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (ray_constants.py:657), read at import: the driver has read
    it already, so its flag is switched; the processes ray.init spawns read the variable. Both are restored,
    so attaching to a cluster later in this process resolves addresses as before.
    """
    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


@contextmanager
def ray_cluster(cfg: RayConfig) -> Iterator[dict]:
    """Yield cluster info; shut Ray down on exit only if this call started it.

    Every listening socket of a local cluster is on loopback. Ray 2.60 has no bind-address setting (no
    RayConfig entry, no agent flag): each server binds loopback when the node address is loopback and every
    interface otherwise (C++ gRPC servers of GCS, raylet and workers; dashboard/agent.py:164-166,
    dashboard/http_server_agent.py:60, dashboard/modules/reporter/reporter_agent.py:534,
    _private/runtime_env/agent/main.py:244, autoscaler/_private/monitor.py:205, dashboard/head.py:361).
    So the node address must stay 127.0.0.1 (``_cluster_mode_off``). Token auth is left on, as Ray sets it.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        runtime_env = {"env_vars": ACTOR_ENV,
                       "worker_process_setup_hook": "raylign.orchestrator.cluster.quiet_worker_logs"}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            with _cluster_mode_off():
                ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, runtime_env=runtime_env,
                         log_to_driver=True, _node_ip_address="127.0.0.1")
        started = True
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "resources": ray.cluster_resources()}
    finally:
        if started:
            ray.shutdown()
