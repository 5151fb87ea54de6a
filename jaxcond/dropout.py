"""The conditional-dropout contract.

A batch's conditioning is a dict of named conditioners (`text`, `pooled`, ...). Each
conditioner belongs to at most one dropout *group*; a group drops all its members
together, for the same examples. The mask of group `g` at training step `s` is

    key  = fold_in(fold_in(fold_in(key(seed, impl="threefry2x32"), s), STREAM_DROPOUT), group_id(g))
    drop = jax.random.bernoulli(key, rate(g, s), (global_batch,))    # True = dropped

with `jax_threefry_partitionable` on, `rate` a float32 and `group_id(g)` the CRC-32 of the
group's name (31 bits). `drop[i]` belongs to position `i` of the step's global batch, the
order in which the data pipeline emits examples (see `jaxcond.data.order`). Consequences:

* the mask does not depend on devices, mesh, hosts or gradient accumulation: it is
  computed once over the global batch and only sliced afterwards;
* `bernoulli` is `uniform(key) < rate`, so raising a rate only adds drops;
* adding, removing or reordering groups never changes another group's mask;
* the mask does not depend on the noise or timestep streams, nor they on it.

A dropped conditioner is replaced by its *null*: `empty` (the encoding of the empty
caption by the current text-encoder params), `zeros`, or `learned` (a trainable
parameter initialised from the empty encoding). Dropout is a training-only operation:
validation and sampling never draw masks; their unconditional branch is what a training
example saw with its caption dropped: every group holding a text conditioner replaced by
its null, and a group of data-supplied conditioners (SDXL's size and crop) only if
training drops it (`unconditional_groups`).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxcond import rng
from jaxcond.checks import check, in_unit_interval, int_at_least, one_of

NULL_KINDS = ("empty", "zeros", "learned")
SCHEDULES = ("constant", "linear_warmup", "every_n_epochs")


@dataclasses.dataclass(frozen=True)
class Group:
    """One dropout group: members dropped together at a (possibly scheduled) rate."""

    name: str
    members: tuple[str, ...]
    rate: float
    schedule: str = "constant"
    # linear_warmup: the rate rises linearly from 0 to `rate` over this many steps.
    warmup_steps: int = 0
    # every_n_epochs: in every n-th epoch (epochs n-1, 2n-1, ...) the rate is `epoch_rate`
    # (1.0 drops every caption, as kohya's caption_dropout_every_n_epochs does).
    every_n_epochs: int = 0
    epoch_rate: float = 1.0

    @property
    def id(self) -> int:
        return group_id(self.name)

    @property
    def drops(self) -> bool:
        """Whether training ever drops this group (some step's rate is above 0): only then
        are its nulls trained."""
        return self.rate > 0 or (self.schedule == "every_n_epochs" and self.epoch_rate > 0)


def unconditional_groups(groups: Sequence[Group], batch_conditioners: Iterable[str]) -> list[Group]:
    """The groups the unconditional branch of guidance (and the validation caption gap)
    replaces by their nulls: every group with a text conditioner, at any rate (a model
    trained at rate 0 gets its untrained null there, as every pipeline gives it one: that
    is why guidance needs dropout), and a group of data-supplied conditioners only if
    training drops it (SDXL's size conditioning at rate 0 keeps its real values, as
    diffusers' pipelines keep them)."""
    data = set(batch_conditioners)
    return [g for g in groups if g.drops or any(m not in data for m in g.members)]


def group_id(name: str) -> int:
    """A stable id from the name alone, so config order never matters."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def groups_from_config(d: ml_collections.ConfigDict, conditioners: Iterable[str] | None = None,
                       data_conditioners: Iterable[str] = ()) -> list[Group]:
    """The groups of `config.dropout` (`d`), checked; conditioner names too when given
    (`data_conditioners`: those the data supplies, which have no `empty` encoding)."""
    groups, owner, ids = [], {}, {}
    for name, g in d.groups.items():
        f = f"dropout.groups.{name}"
        in_unit_interval(f"{f}.rate", g.rate)
        one_of(f"{f}.schedule", g.schedule, SCHEDULES)
        if g.schedule == "linear_warmup":
            int_at_least(f"{f}.warmup_steps", g.warmup_steps, 1)
        if g.schedule == "every_n_epochs":
            int_at_least(f"{f}.every_n_epochs", g.every_n_epochs, 1)
            in_unit_interval(f"{f}.epoch_rate", g.epoch_rate)
        # Two names with one CRC-32 would draw the same key, hence identical masks.
        check(group_id(name) not in ids, "dropout.groups", sorted(d.groups),
              f"groups {ids.get(group_id(name))!r} and {name!r} have the same id (CRC-32 of the name), "
              "so they would drop the same examples; rename one of them")
        ids[group_id(name)] = name
        members = tuple(g.members)
        check(len(members) > 0, f"{f}.members", g.members, "must name at least one conditioner")
        for m in members:
            check(m not in owner, f"{f}.members", g.members,
                  f"{m!r} is already in group {owner.get(m)!r}; a conditioner belongs to one group")
            owner[m] = name
            check(m in d.nulls, f"{f}.members", g.members,
                  f"{m!r} has no null: add config.dropout.nulls.{m} = 'empty' | 'zeros' | 'learned'")
        groups.append(Group(name=name, members=members, rate=float(g.rate), schedule=g.schedule,
                            warmup_steps=int(g.warmup_steps), every_n_epochs=int(g.every_n_epochs),
                            epoch_rate=float(g.epoch_rate)))
    for m, kind in d.nulls.items():
        one_of(f"dropout.nulls.{m}", kind, NULL_KINDS)
    if conditioners is not None:
        known = tuple(conditioners)
        for m in owner:
            check(m in known, f"dropout.groups.{owner[m]}.members", m, f"unknown conditioner; this model has {known}")
        for m in d.nulls:
            check(m in known, f"dropout.nulls.{m}", d.nulls[m],
                  f"{m!r} is not a conditioner of this model; it has {known}")
            check(m not in data_conditioners or d.nulls[m] != "empty", f"dropout.nulls.{m}",
                  "empty", f"{m!r} comes from the data, not the caption, so it has no empty-caption "
                  "encoding; use 'zeros' or 'learned'")
    return groups


def group_rate(group: Group, step: jax.Array | int, steps_per_epoch: int) -> jax.Array:
    """The group's rate at `step`, computed from the traced step (no recompilation)."""
    step = jnp.asarray(step, jnp.int32)
    base = jnp.float32(group.rate)
    if group.schedule == "constant":
        return base
    if group.schedule == "linear_warmup":
        frac = jnp.minimum(step.astype(jnp.float32) / max(group.warmup_steps, 1), 1.0)
        return base * frac
    if group.schedule == "every_n_epochs":
        epoch = step // steps_per_epoch
        on = (epoch + 1) % group.every_n_epochs == 0
        return jnp.where(on, jnp.float32(group.epoch_rate), base)
    raise ValueError(f"unknown dropout schedule {group.schedule!r}; use one of {SCHEDULES}")


def group_mask(seed: int, step: jax.Array | int, group: Group, global_batch: int,
               rate: jax.Array | float) -> jax.Array:
    """bool[global_batch], True where the group is dropped. See the module docstring."""
    with rng.derivation():
        key = jax.random.fold_in(rng.stream_key(seed, step, rng.STREAM_DROPOUT), group.id)
        return jax.random.bernoulli(key, jnp.asarray(rate, jnp.float32), (global_batch,))


def masks(seed: int, step: jax.Array | int, groups: Sequence[Group], global_batch: int,
          steps_per_epoch: int) -> dict[str, jax.Array]:
    """All groups' masks of one step, keyed by group name."""
    return {
        g.name: group_mask(seed, step, g, global_batch, group_rate(g, step, steps_per_epoch))
        for g in groups
    }


def null_values(kinds: Mapping[str, str], empty: Mapping[str, jax.Array],
                learned: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The null of each conditioner, without a batch dimension.

    `empty` holds the empty-caption encodings with a leading batch dim of 1 (it also fixes
    shapes and dtypes); `learned` holds the trainable nulls.
    """
    out = {}
    for name, kind in kinds.items():
        like = empty[name][0]
        if kind == "empty":
            out[name] = like
        elif kind == "zeros":
            out[name] = jnp.zeros_like(like)
        elif kind == "learned":
            out[name] = learned[name].astype(like.dtype)
        else:
            raise ValueError(f"unknown null kind {kind!r} for {name!r}; use one of {NULL_KINDS}")
    return out


def apply(cond: Mapping[str, jax.Array], nulls: Mapping[str, jax.Array],
          group_masks: Mapping[str, jax.Array], groups: Sequence[Group]) -> dict[str, jax.Array]:
    """Replaces each dropped example's conditioners by their nulls."""
    out = dict(cond)
    for g in groups:
        m = group_masks[g.name]
        for name in g.members:
            x = cond[name]
            drop = m.reshape(m.shape + (1,) * (x.ndim - 1))
            out[name] = jnp.where(drop, nulls[name].astype(x.dtype), x)
    return out
