"""How `make test` spreads the suite over pytest-xdist workers (`-n 2 --dist loadgroup`).

Each integration file is one group, so its module fixtures start once and its tests run on one worker;
test_train_runs.py joins test_cli_runs.py's group because both read the session `grpo_cli_run` fixture.
The groups are queued longest first (seconds measured on a fresh clone, 2 cores; a new file counts as
DEFAULT_S) and the unit tests last, where they fill the gaps. Without xdist the marks do nothing.
"""

from pathlib import Path

import pytest

SHARED_GROUPS = {"test_train_runs": "test_cli_runs"}
MEASURED_S = {
    "test_cli_runs": 450, "test_deepspeed_lora": 450, "test_preference_runs": 260, "test_pg_variants": 180,
    "test_recovery": 160, "test_actor_faults": 130, "test_weight_transport": 110, "test_multinode": 100,
}
DEFAULT_S = 60


def _group(item) -> str | None:
    path = Path(str(item.fspath))
    if path.parent.name != "integration":
        return None
    return SHARED_GROUPS.get(path.stem, path.stem)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(name=group))
    # Stable sort: the order inside a file is kept.
    items.sort(key=lambda item: -MEASURED_S.get(_group(item), DEFAULT_S) if _group(item) else 0)
