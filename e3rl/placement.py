"""Placement groups that fail fast: a role's bundles are reserved within a timeout or refused with
one line that names the config fields to change (an actor would otherwise pend forever)."""
from __future__ import annotations

from typing import Any, Sequence

from e3rl.config import ConfigError


def reserve_bundles(bundles: Sequence[dict[str, float]], strategy: str, timeout_s: float, role: str,
                    fields: str) -> Any:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    clean = [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles]  # no empty bundles
    pg = placement_group(clean, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        have = ray.available_resources()
        raise ConfigError(
            f"{fields}: {role} need {len(clean)} x {clean[0]} ({strategy}) but the cluster could not place "
            f"them within {timeout_s:.0f}s (available CPU {have.get('CPU', 0):g}, GPU {have.get('GPU', 0):g}) — "
            "lower them or add nodes"
        ) from None
    return pg


def bundles_per_node(pg: Any) -> list[int]:
    """For each bundle of a ready placement group, how many of its bundles share that bundle's node.

    A role's actors on one node compute at the same time (generators decode together; learner ranks
    step together), so they split the node's cores between them: `actor_threads(share=...)`."""
    from ray.util.placement_group import placement_group_table

    nodes = placement_group_table(pg)["bundles_to_node_id"]  # {bundle index: node id}
    return [sum(1 for other in nodes.values() if other == nodes[i]) for i in range(len(nodes))]
