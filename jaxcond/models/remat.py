"""Rematerialisation (gradient checkpointing) and per-layer FSDP gathers inside diffusers'
Flax UNet.

`model.remat` names a policy, what the backward pass keeps and what it recomputes:
- `none` keeps every activation;
- `blocks` keeps only what enters each UNet block (down, mid, up) and recomputes the rest
  of the block in its backward pass; `blocks_keep_matmuls` recomputes only the cheap ops
  inside a block (norms, activations, elementwise), keeping every matmul and convolution
  output (jax.checkpoint_policies.dots_saveable);
- `layers` does the same per layer (each transformer block and res block), and
  `layers_keep_matmuls` keeps the matmul outputs without batch dimensions there (the
  projections; attention scores are recomputed: dots_with_no_batch_dims_saveable);
- `full` keeps only the UNet's inputs and recomputes the whole forward pass.
The result is the same to float rounding; the cost is a second forward pass of what is
recomputed (`jaxcond plan` prints the FLOPs of each).

With FSDP-sharded params (`jaxcond.sharding.gathering`), each layer gathers its own params
where it runs, so the step never holds the whole parameter tree gathered. Under a remat
policy the gather is inside the recomputed region, so the backward pass gathers again
instead of keeping the gathered copy: only with remat does FSDP shrink the peak.

With `scan_layers`, each spatial transformer runs its `depth` transformer blocks as one
`lax.scan` over their params stacked on a new leading axis, instead of `depth` copies of
the block in the program. The result is the same; the compiled program is smaller (SDXL's
70 blocks become 11 traced ones), and so are the compiler's time and host memory. The
stacked params are a copy, sharded as the params are.

diffusers builds its blocks in `setup` from names in its modules, so `wrapped` puts
wrapped versions under those names while a UNet is applied (setup runs inside `apply`);
parameters and their names are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcond import sharding

_NOTHING = "nothing saved"
# policy -> (where, what is saved inside); `full` is applied by the family around the UNet.
POLICIES = {"none": (None, None), "blocks": ("blocks", _NOTHING),
            "blocks_keep_matmuls": ("blocks", jax.checkpoint_policies.dots_saveable),
            "layers": ("layers", _NOTHING),
            "layers_keep_matmuls": ("layers", jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
            "full": ("full", _NOTHING)}
_UNET = "diffusers.models.unets.unet_2d_condition_flax"
_BLOCKS = {_UNET: ("FlaxCrossAttnDownBlock2D", "FlaxDownBlock2D", "FlaxUNetMidBlock2DCrossAttn",
                   "FlaxCrossAttnUpBlock2D", "FlaxUpBlock2D")}
# Every module holding params below the blocks, by the module namespace that builds it.
_LAYERS = {"diffusers.models.attention_flax": ("FlaxBasicTransformerBlock",),
           "diffusers.models.unets.unet_2d_blocks_flax": ("FlaxResnetBlock2D", "FlaxDownsample2D",
                                                          "FlaxUpsample2D")}
# Param-path parts under which a layer gathers its own params; the rest (the UNet's
# embeddings, in/out convs, the transformers' projections) is gathered by the family.
LAYER_SCOPES = ("transformer_blocks_", "resnets_", "downsamplers_", "upsamplers_")
_TRANSFORMER = ("diffusers.models.unets.unet_2d_blocks_flax", "FlaxTransformer2DModel")


def _scanned(base: type, block: type, per_layer: bool, keep: object) -> type:
    """diffusers' FlaxTransformer2DModel (`base`) with its blocks (`block`, unwrapped) run as
    one lax.scan; each step gathers its block's params (FSDP) and, with `per_layer`, is
    rematerialised, as `wrapped` does to the unrolled blocks."""

    class ScannedTransformer2DModel(base):
        def __call__(self, hidden_states, context, deterministic=True):
            if self.depth == 1 or self.is_initializing():
                return super().__call__(hidden_states, context, deterministic)
            # diffusers' __call__, the loop over its blocks replaced by the scan.
            batch, height, width, channels = hidden_states.shape
            residual = hidden_states
            h = self.norm(hidden_states)
            if self.use_linear_projection:
                h = self.proj_in(h.reshape(batch, height * width, channels))
            else:
                h = self.proj_in(h).reshape(batch, height * width, channels)
            layer = block(self.n_heads * self.d_head, self.n_heads, self.d_head, dropout=self.dropout,
                          only_cross_attention=self.only_cross_attention, dtype=self.dtype,
                          use_memory_efficient_attention=self.use_memory_efficient_attention,
                          split_head_dim=self.split_head_dim, parent=None)
            params = self.variables["params"]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *(params[f"transformer_blocks_{i}"] for i in range(self.depth)))

            def step(h, p):
                return layer.apply({"params": sharding.gather(p)}, h, context, deterministic), None

            if per_layer:
                step = jax.checkpoint(step, policy=_policy(keep))
            h, _ = jax.lax.scan(step, h, stacked)
            if self.use_linear_projection:
                h = self.proj_out(h).reshape(batch, height, width, channels)
            else:
                h = self.proj_out(h.reshape(batch, height, width, channels))
            return self.dropout_layer(h + residual, deterministic=deterministic)

    return ScannedTransformer2DModel


def _remat(cls: type, keep: object) -> type:
    return nn.remat(cls, policy=_policy(keep))


def _policy(keep: object) -> object:
    """jax.checkpoint's policy for what POLICIES says is saved."""
    return None if keep is _NOTHING else keep


@contextlib.contextmanager
def wrapped(policy: str, scan_layers: bool = False) -> Iterator[None]:
    """While open, UNets built by diffusers rematerialise by `policy` and, inside
    `sharding.gathering`, gather each layer's params where the layer runs; with
    `scan_layers`, each spatial transformer scans over its blocks."""
    import importlib

    where, keep = POLICIES[policy]
    gather = sharding.gathering_active()
    saved = []
    try:
        if scan_layers:
            module = importlib.import_module(_TRANSFORMER[0])
            original = getattr(module, _TRANSFORMER[1])
            block = importlib.import_module("diffusers.models.attention_flax").FlaxBasicTransformerBlock
            saved.append((module, _TRANSFORMER[1], original))
            setattr(module, _TRANSFORMER[1], _scanned(original, block, where == "layers", keep))
        for scope in (_LAYERS, _BLOCKS):
            for module_name, names in scope.items():
                module = importlib.import_module(module_name)
                for name in names:
                    cls = original = getattr(module, name)
                    if gather and scope is _LAYERS:
                        cls = sharding.gathering_own_params(cls)
                    if where == ("layers" if scope is _LAYERS else "blocks"):
                        cls = _remat(cls, keep)
                    if cls is not original:
                        saved.append((module, name, original))
                        setattr(module, name, cls)
        yield
    finally:
        for module, name, cls in reversed(saved):
            setattr(module, name, cls)
