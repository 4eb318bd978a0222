"""Connecting to Ray the way every job here should: join a cluster if there is one, else start one.

``ray job submit`` sets RAY_ADDRESS for the driver, and a machine with ``ray start --head`` has a
cluster to join; otherwise a local Ray is started. Ray Train workers hold their CPUs for the whole
run while Ray Data still needs CPUs to read and preprocess, so a local Ray is given enough logical
CPUs for both (more than the cores a laptop has is fine: they are scheduling slots).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def ensure_ray(min_cpus: int = 0) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    try:
        ray.init(address="auto")
    except (ConnectionError, ValueError):
        ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus, 4))


def check_room_for_data(train_cpus: int) -> None:
    """Warn when Ray Train's workers would leave no CPU for Ray Data (the run would wait forever)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    if total - train_cpus < 1:
        logger.warning(
            "Ray has %s CPUs and the training workers take %s: Ray Data has none left to read shards and will "
            "wait for the cluster to scale up. Lower num_workers/cpus_per_worker or add CPUs.", total, train_cpus
        )
