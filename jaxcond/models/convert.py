"""Weights between the Flax and PyTorch layouts of diffusers/transformers models, without torch.

One naming rule serves both directions, so loading and exporting cannot drift apart:
a Flax path component `name_<i>` is the PyTorch list entry `name.<i>` (except the
`linear_1`/`linear_2` layers, which PyTorch spells the same), diffusers' Flax attention
layers `query`/`key`/`value`/`proj_attn` are PyTorch's `to_q`/`to_k`/`to_v`/`to_out.0`,
and the leaves convert as

    kernel [H, W, I, O]  <->  weight [O, I, H, W]   (convolutions)
    kernel [I, O]        <->  weight [O, I]         (linear layers)
    scale / embedding    <->  weight                (norms, embeddings)
    bias                 <->  bias

This covers the UNet and VAE of diffusers 0.39 and transformers' CLIP text encoders; the
parity tests load the PyTorch side into the real PyTorch classes with strict key checks.
Tensors are read and written with safetensors' Flax backend (bfloat16 included), never
with pickle: a `.bin` file is refused by the loaders that call this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_INDEXED = re.compile(r"(\w+)_(\d+)")
_NOT_INDEXED = ("linear",)  # TimestepEmbedding's linear_1/linear_2 are attribute names
# Buffers PyTorch checkpoints may carry that are not parameters (CLIP's position ids).
IGNORED_PYTORCH_KEYS = re.compile(r".*position_ids$")
_SHOW = 20  # keys listed in a mismatch error before "... and N more"


class WeightsMismatch(ValueError):
    """A checkpoint's tensors do not fit the model its config describes."""


def _component(name: str) -> str:
    m = _INDEXED.fullmatch(name)
    if m and m.group(1) not in _NOT_INDEXED:
        return f"{m.group(1)}.{m.group(2)}"
    return name


def pytorch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of the Flax parameter at `path` (a tuple of names)."""
    *parents, leaf = path
    parents = [_component(p) for p in parents]
    if parents and parents[-1] in _ATTENTION:
        parents[-1] = _ATTENTION[parents[-1]]
    if leaf in ("kernel", "scale", "embedding"):
        leaf = "weight"
    return ".".join(parents + [leaf])


def _to_pytorch_layout(path: tuple[str, ...], x: Any) -> Any:
    if path[-1] == "kernel":
        return jnp.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
    return x


def _pytorch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return shape


def _to_flax_layout(path: tuple[str, ...], x: Any) -> Any:
    if path[-1] == "kernel":
        return jnp.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
    return x


def to_pytorch(params: Mapping) -> dict[str, jax.Array]:
    """A Flax param tree -> PyTorch state dict (same dtypes)."""
    return {pytorch_key(p): _to_pytorch_layout(p, jnp.asarray(x)) for p, x in flatten_dict(params).items()}


def _listing(title: str, items: list[str]) -> str:
    more = f"\n  ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"{title} ({len(items)}):\n  " + "\n  ".join(items[:_SHOW]) + more


def _fits_or_raise(source: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    problems = [_listing(t, sorted(v)) for t, v in (("missing", missing), ("unexpected", unexpected),
                                                    ("wrong shape", shapes)) if v]
    if problems:
        raise WeightsMismatch(f"{source} does not fit the model its config describes; "
                              "is it the right file for this config?\n" + "\n".join(problems))


def from_pytorch(tensors: Mapping[str, Any], template: Mapping, source: str = "checkpoint") -> dict:
    """PyTorch state dict -> Flax params shaped like `template` (arrays or ShapeDtypeStructs).

    Every template parameter must be present with the right shape and every tensor must be
    used; otherwise WeightsMismatch lists the missing, unexpected and mis-shaped keys.
    """
    out, used, missing, shapes = {}, set(), [], []
    for path, want in flatten_dict(template).items():
        key = pytorch_key(path)
        if key not in tensors:
            missing.append(f"{key} (Flax {'/'.join(path)}, shape {tuple(want.shape)})")
            continue
        used.add(key)
        x = _to_flax_layout(path, jnp.asarray(tensors[key]))
        if x.shape != tuple(want.shape):
            shapes.append(f"{key}: checkpoint {tuple(tensors[key].shape)}, model wants "
                          f"{_pytorch_shape(path, tuple(want.shape))}")
            continue
        out[path] = x.astype(want.dtype)
    _fits_or_raise(source, missing, [k for k in tensors if k not in used and not IGNORED_PYTORCH_KEYS.fullmatch(k)],
                   shapes)
    return unflatten_dict(out)


def check_fits(params: Mapping, template: Mapping, source: str) -> dict:
    """`params` (a Flax tree read from `source`) if it has exactly `template`'s paths and
    shapes; otherwise WeightsMismatch, as `from_pytorch` reports a PyTorch checkpoint."""
    have, want = flatten_dict(params), flatten_dict(template)
    _fits_or_raise(source, ["/".join(p) for p in want.keys() - have.keys()],
                   ["/".join(p) for p in have.keys() - want.keys()],
                   [f"{'/'.join(p)}: checkpoint {tuple(have[p].shape)}, model wants {tuple(w.shape)}"
                    for p, w in want.items() if p in have and tuple(have[p].shape) != tuple(w.shape)])
    return params


def read_safetensors(paths: Iterable[str]) -> dict[str, jax.Array]:
    """All tensors of one or more .safetensors files (a sharded checkpoint's parts)."""
    from safetensors import safe_open

    tensors: dict[str, jax.Array] = {}
    for path in paths:
        with safe_open(path, framework="flax") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.flax import save_file

    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, path, metadata=dict(metadata or {}))
