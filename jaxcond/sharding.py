"""Device mesh and the placement of arrays on it.

The mesh has axes ("data", "fsdp"). The batch is split over both; parameters and
optimizer state are replicated (sharding them over "fsdp" is the scale-out work).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = P(AXES)


def make_mesh(shape: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A mesh with the given axis sizes (as returned by config.mesh_shape)."""
    devices = jax.devices() if devices is None else devices
    grid = np.asarray(devices).reshape([shape[a] for a in AXES])
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dimension split over every mesh axis."""
    return NamedSharding(mesh, BATCH)


def state_shardings(mesh: Mesh, state: Any) -> Any:
    """Sharding of every leaf of the train state (all replicated for now)."""
    return jax.tree.map(lambda _: replicated(mesh), state)


def put_batch(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays of the full global batch -> global arrays split over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
