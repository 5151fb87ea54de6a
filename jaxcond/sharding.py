"""Device mesh, sharding rules, and the placement of arrays on the mesh.

Mesh axes are ("data", "fsdp"). The batch is split over both. Parameters, optimizer
state, EMA and frozen weights follow one rule (`param_spec`): a tensor of at least
`min_size` elements is split over "fsdp" along its largest dimension that the axis
divides; anything smaller or indivisible is replicated. With fsdp=1 everything is
replicated (plain data parallelism). XLA inserts the all-gathers and reduce-scatters.

Inside the step, params are gathered where they are used: a family calls `gather` on the
params of each layer as the layer runs (for the UNet, `jaxcond.models.remat`), so the step
never holds the whole tree gathered, and the gradients leave each layer to be
reduce-scattered onto their shards.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcond.checks import ConfigError, check, int_at_least

AXES = ("data", "fsdp")
BATCH = P(AXES)


def mesh_shape(m: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes of `config.mesh` (`m`) with the one -1 filled in; checked against the
    device count."""
    sizes = {"data": m.data, "fsdp": m.fsdp}
    free = [k for k, v in sizes.items() if v == -1]
    check(len(free) <= 1, "mesh", dict(sizes), "at most one axis may be -1")
    for k, v in sizes.items():
        check(isinstance(v, int) and (v >= 1 or v == -1), f"mesh.{k}", v, "must be -1 or >= 1")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        check(num_devices % fixed == 0, f"mesh.{free[0]}", -1,
              f"the other axes use {fixed} devices, which does not divide the {num_devices} available")
        sizes[free[0]] = num_devices // fixed
    total = sizes["data"] * sizes["fsdp"]
    check(total == num_devices, "mesh", dict(sizes),
          f"axis sizes multiply to {total} but {num_devices} devices are available")
    return sizes


def validate(m: ml_collections.ConfigDict, num_devices: int | None, global_batch: int, grad_accum: int) -> None:
    """Checks `config.mesh` (`m`), and with `num_devices` that the mesh fits them and the batch."""
    int_at_least("mesh.dcn_data", m.dcn_data, 1)
    int_at_least("mesh.fsdp_min_size", m.fsdp_min_size, 1)
    if num_devices is None:
        return
    sizes = mesh_shape(m, num_devices)
    shards = sizes["data"] * sizes["fsdp"]
    check(sizes["data"] % m.dcn_data == 0, "mesh.dcn_data", m.dcn_data,
          f"must divide the data axis ({sizes['data']}): each slice holds an equal part of it")
    micro = global_batch // grad_accum
    check(micro % shards == 0, "train.global_batch", global_batch,
          f"each micro-batch ({micro} = global_batch / grad_accum) must split evenly over the "
          f"{shards} devices of the mesh (data x fsdp); use a multiple of {shards * grad_accum}")


def check_slices(dcn_data: int, devices: list) -> None:
    """Multi-slice meshes need TPU slices."""
    if dcn_data > 1 and getattr(devices[0], "slice_index", None) is None:
        raise ConfigError(
            f"config.mesh.dcn_data = {dcn_data}: these {devices[0].platform} devices are "
            "not TPU slices (no slice_index); use 1 unless the run spans several TPU slices")


def make_mesh(shape: Mapping[str, int], devices: list | None = None,
              dcn_data: int = 1) -> Mesh:
    """A mesh with the given axis sizes (as returned by `mesh_shape`).

    `dcn_data` > 1 splits the data axis over that many TPU slices (multi-slice): a hybrid
    mesh keeps fsdp traffic on the fast in-slice interconnect and only data-parallel
    gradient reductions on the data-centre network.
    """
    devices = jax.devices() if devices is None else devices
    sizes = [shape[a] for a in AXES]
    if dcn_data > 1:
        ici = [sizes[0] // dcn_data, sizes[1]]
        grid = mesh_utils.create_hybrid_device_mesh(ici, [dcn_data, 1], devices)
    elif devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh(sizes, devices)  # follows the physical torus
    else:
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dimension split over every mesh axis."""
    return NamedSharding(mesh, BATCH)


_GATHER: contextvars.ContextVar = contextvars.ContextVar("jaxcond_gather", default=None)


@contextlib.contextmanager
def gathering(target: NamedSharding | None) -> Iterator[None]:
    """While tracing inside it, `gather` places params at `target` (replicated: FSDP's
    all-gather). None: `gather` leaves them as they are."""
    token = _GATHER.set(target)
    try:
        yield
    finally:
        _GATHER.reset(token)


def gathering_active() -> bool:
    return _GATHER.get() is not None


def gather(tree: Any) -> Any:
    """`tree` where `gathering` says params are used (unchanged outside it)."""
    target = _GATHER.get()
    return tree if target is None else jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: target, tree))


def gathering_own_params(cls: type) -> type:
    """Flax module class `cls` gathering its own params (`gather`) where it runs: a layer of
    an FSDP step that never holds the whole tree gathered."""
    import flax.linen as nn

    return nn.map_variables(cls, "params", trans_in_fn=gather, init=False, mutable=False)


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """The rule: largest fsdp-divisible dimension of a big enough tensor goes over "fsdp"."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for d in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[d] % fsdp == 0:
            return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
    return P()


def param_shardings(mesh: Mesh, tree: Any, min_size: int) -> Any:
    """NamedSharding of every leaf of `tree` (arrays or ShapeDtypeStructs) by `param_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size)), tree)


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """`tree` with arrays already on `mesh`'s devices as they are (a training run's fsdp
    split) and everything else replicated onto it."""
    devices = set(mesh.devices.flat)
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) and x.sharding.device_set == devices
                        else jax.device_put(x, replicated(mesh)), tree)


def local_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """Positions of the global batch that land on this process's devices, ascending."""
    slices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
    return np.array(sorted({r for s in slices for r in range(*s[0].indices(global_batch))}))


def assemble(mesh: Mesh, global_batch: int, rows: np.ndarray,
             local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays split over the mesh from this process's `rows` of each (`local`)."""
    sh = batch_sharding(mesh)
    where = {int(r): i for i, r in enumerate(rows)}

    def piece(x: np.ndarray) -> Callable[[tuple[slice, ...]], np.ndarray]:
        return lambda idx: x[[where[r] for r in range(*idx[0].indices(global_batch))]]

    return {k: jax.make_array_from_callback((global_batch,) + v.shape[1:], sh, piece(v))
            for k, v in local.items()}


def put_batch(mesh: Mesh, ids: np.ndarray,
              load: Callable[[np.ndarray], Mapping[str, np.ndarray]]) -> dict[str, jax.Array]:
    """The global batch of record `ids` as arrays split over the mesh.

    Each process calls `load` once, for only the records that land on its own devices,
    so in a multi-host run every host reads its share and no host reads it all.
    """
    rows = local_rows(mesh, len(ids))
    return assemble(mesh, len(ids), rows, load(ids[rows]))


def bytes_per_device(tree: Any) -> int:
    """Bytes the largest-loaded device holds of `tree` (arrays or sharded ShapeDtypeStructs)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def bytes_total(tree: Any) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def summary(mesh: Mesh, state: Any, frozen: Any, global_batch: int, grad_accum: int) -> str:
    """One screen: mesh, per-device bytes of each part of the state, batch split."""
    mib = 2.0 ** 20
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    lines = [f"mesh {dict(mesh.shape)} over {mesh.size} device(s), {jax.process_count()} process(es), "
             f"platform {mesh.devices.flat[0].platform}"]
    parts = {"params": state["params"], "optimizer state": state["opt_state"],
             "ema": state.get("ema", {}), "frozen (no optimizer state)": frozen}
    for name, tree in parts.items():
        if jax.tree.leaves(tree):
            lines.append(f"  {name:<28} {bytes_total(tree) / mib:9.2f} MiB total, "
                         f"{bytes_per_device(tree) / mib:9.2f} MiB per device")
    lines.append(f"  batch: global {global_batch}, per device {global_batch // shards}, "
                 f"per process {global_batch * len(mesh.local_devices) // mesh.size}, "
                 f"micro-batches {grad_accum}")
    return "\n".join(lines)
