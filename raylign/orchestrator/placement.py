"""``ray.placement``: how one role's actors (the generator replicas of a pool, the trainer workers) lie over
the cluster's nodes. ``pack`` and ``spread`` reserve one Ray placement group per role, one bundle per actor
(``PACK``: as few nodes as possible; ``SPREAD``: one per node where the cluster has enough nodes, else packed),
so a replacement actor starts in its predecessor's bundle, on the same node. ``default`` reserves nothing and
leaves the generator replicas to Ray's scheduler. The trainer's workers are always in a placement group (Ray
Train's own), with the same strategy names.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PLACE_TIMEOUT_S = 120.0  # a group the cluster cannot place in this long is an error, not a silent wait


class PlacementError(RuntimeError):
    """The cluster cannot reserve a role's placement group; the message names the setting and the bundles."""


def bundle(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """One actor's reservation, as its actor options ask for it."""
    return {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}


def trainer_strategy(placement: str) -> str:
    """Ray Train's placement_strategy for ``ray.placement`` (its default, PACK, unless spread is asked)."""
    return "SPREAD" if placement == "spread" else "PACK"


def reserve(bundles: list[dict[str, float]], placement: str, role: str,
            timeout_s: float = PLACE_TIMEOUT_S) -> PlacementGroup | None:
    """A placement group of ``bundles`` for ``role`` (None with ``placement=default``)."""
    if placement == "default":
        return None
    group = placement_group(bundles, strategy=placement.upper())
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise PlacementError(f"ray.placement={placement}: the cluster could not place {len(bundles)} {role} "
                             f"bundle(s) of {bundles[0]} within {timeout_s:.0f} s; it lacks those resources "
                             "(ray status shows what each node has)") from None
    return group


def in_group(group: PlacementGroup | None, index: int) -> dict:
    """Actor options that start an actor in bundle ``index`` of ``group`` (none without a group)."""
    if group is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}


def release(group: PlacementGroup | None) -> None:
    if group is not None:
        remove_placement_group(group)
