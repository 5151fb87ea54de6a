"""The train step as one program compiled for a mesh: what `jaxcond train` runs and
`jaxcond plan` compiles ahead of time, built by the same code so the plan is the run.

`jit_step` fixes the shardings (state and frozen params by `jaxcond.sharding`'s rule,
every batch field split over the mesh) and donates the state; `batch_shapes` gives the
global batch's fields as the loader makes them, without data; `Memory` reads the compiled
program's per-device memory, the compiler's own numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcond import sharding, train_step as ts, xla
from jaxcond.models.family import Family


def jit_step(family: Family, spec: ts.StepSpec, tx: optax.GradientTransformation, lr: optax.Schedule,
             mesh: jax.sharding.Mesh, state_shardings: Any, frozen_shardings: Any,
             compiler_options: dict[str, Any] | None = None) -> Any:
    """The train step of `spec` jitted for `mesh`, state donated, with `compiler_options`
    (default: jaxcond's for the mesh's platform, `jaxcond.xla`)."""
    if compiler_options is None:
        compiler_options = xla.options(mesh.devices.flat[0].platform)
    return jax.jit(functools.partial(ts.train_step, family, spec, tx, lr,
                                     compute_sharding=sharding.replicated(mesh)),
                   in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,), compiler_options=compiler_options)


def batch_shapes(family: Family, params: Any, global_batch: int, height: int, width: int,
                 cached: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's fields (shapes and dtypes) for images of `height` x `width`, as
    `jaxcond.data.pipeline` loads them, or a cache (`jaxcond.data.cache`) when `cached`.
    `params`: frozen and trainable (shapes are enough)."""
    b = global_batch
    images = jax.ShapeDtypeStruct((b, height, width, 3), jnp.uint8)
    tokens = jax.ShapeDtypeStruct((b,) + family.tokenize([""]).shape[1:], jnp.int32)
    out = {"time_ids": jax.ShapeDtypeStruct((b, 6), jnp.float32)}
    if not cached:
        return {**out, "images": images, "tokens": tokens}
    for k, v in jax.eval_shape(family.encode, params, tokens).items():
        out[f"cond/{k}"] = v
    if family.latent:
        out["moments"] = jax.eval_shape(family.image_moments, params, images)
    else:
        out["images"] = images
    return out


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves placed by `shardings` (a tree or one sharding)."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)


@dataclasses.dataclass(frozen=True)
class Memory:
    """A compiled program's memory on one device, in bytes (`compiled.memory_analysis()`)."""

    arguments: int  # inputs: state, frozen params, batch
    outputs: int
    aliased: int  # outputs written over donated inputs (the new state over the old)
    temporaries: int  # activations, gathered params, gradients, workspace
    code: int

    @property
    def peak(self) -> int:
        """What the device must hold at once while the step runs."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @staticmethod
    def of(compiled: Any) -> Memory | None:
        m = compiled.memory_analysis()
        if m is None:  # some backends do not say
            return None
        return Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                      int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes))


def _cost(compiled: Any, key: str) -> float | None:
    """One figure of the compiled program's cost analysis (per device), None if absent."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    value = (cost or {}).get(key)
    return float(value) if value is not None and np.isfinite(value) and value > 0 else None


def flops(compiled: Any) -> float | None:
    """The compiled step's floating-point operations per device (recomputation included)."""
    return _cost(compiled, "flops")


def bytes_accessed(compiled: Any) -> float | None:
    return _cost(compiled, "bytes accessed")


def lowered_cost(lowered: Any) -> dict[str, float]:
    """The cost analysis of a lowered (traced, not compiled) program, whole and unpartitioned,
    by XLA's HLO cost model on the host CPU's client: for any target, a TPU topology's too,
    whose lowered programs report none."""
    from jax._src.lib import _jax  # the one binding of XLA's HLO cost analysis (jax pinned)

    module = lowered.compiler_ir("hlo").as_hlo_module()
    return dict(_jax.hlo_module_cost_analysis(jax.local_devices(backend="cpu")[0].client, module))
