"""How `make test` spreads the suite over pytest-xdist workers (`-n 2`).

Each integration file is one unit of work, so its module fixtures start once and its tests run on one worker
in file order; test_train_runs.py joins test_cli_runs.py's unit because both read the session `grpo_cli_run`
fixture (and its run folder). Units are queued longest first (seconds measured on a fresh clone, 2 cores, rounded; a
new file counts as DEFAULT_S) and the unit tests last, one test per unit, where they fill the gaps. (xdist's
own `--dist loadgroup` did not keep marked files together with pytest 9.2 here: every test went its own way.)
Without xdist these hooks only order the files.
"""

import os
from pathlib import Path

import pytest

SHARED_UNITS = {"test_train_runs": "test_cli_runs"}
MEASURED_S = {
    "test_rag_train": 550, "test_cli_runs": 450, "test_deepspeed_lora": 450, "test_preference_runs": 350,
    "test_rag_store": 300, "test_train": 250, "test_recovery": 250, "test_pg_variants": 250, "test_actor_faults": 150,
    "test_autodspy": 150, "test_trainer_group": 150, "test_weight_transport": 110, "test_multinode": 100,
}
DEFAULT_S = 60


def unit_of(nodeid: str) -> str | None:
    """The integration file a test belongs to (shared units joined); None for a unit test."""
    path = Path(nodeid.split("::", 1)[0])
    if path.parent.name != "integration":
        return None
    return SHARED_UNITS.get(path.stem, path.stem)


def pytest_collection_modifyitems(config, items):
    # Stable sort: the order inside a file is kept.
    items.sort(key=lambda item: -MEASURED_S.get(unit_of(item.nodeid), DEFAULT_S) if unit_of(item.nodeid) else 0)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid) or nodeid

    config.option.loadscopereorder = False  # keep the collection order: longest first
    return FileUnits(config, log)


@pytest.fixture(scope="session")
def s3_bucket():
    """An S3 endpoint on this machine (moto's server: the S3 wire protocol over HTTP) with one empty bucket; yields
    its pyarrow URI. The AWS variables it sets reach the actors of clusters started after it, and subprocesses."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="raylign-test", AWS_SECRET_ACCESS_KEY="raylign-test",
                      AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="raylign-test")
    yield f"s3://raylign-test?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
