"""LoRA adapters: low-rank updates of chosen weight matrices, trained while the base
model stays frozen.

A targeted kernel W (a Dense [in, out] or a convolution [kh, kw, in, out]) is used as

    W + (alpha / rank) * down @ up,   down [..., in, rank], up [rank, out]

merged inside the step (the merge costs 2 * rank * |W| FLOPs per step, little next to
the model's; every Flax module then runs unchanged). With bfloat16 compute the merged
kernel is rounded to bfloat16 like every weight, so an update below about 1/256 of a
weight shows in the forward pass only once it grows past that (its gradient flows either
way); float32 compute keeps it exact. As kohya and PEFT initialise them,
`down` is uniform in +-1/sqrt(fan_in) and `up` is zero, so step 0 is the base model.

Adapters mirror their part's param tree: the kernel at `.../attn1/to_q/kernel` has
`{"down", "up"}` at `.../attn1/to_q`. Files: `to_files` writes them in the diffusers/PEFT
layout that `pipeline.load_lora_weights` reads (`unet.<module>.lora_A.weight`,
`lora_B.weight`, the scale folded into B) or in kohya's (`lora_unet_<module>.lora_down.weight`,
`.lora_up.weight`, `.alpha`) that ComfyUI and AUTOMATIC1111 read; `from_file` reads both.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcond.checks import ConfigError, check, int_at_least
from jaxcond.models import convert

# Target sets by name, as regexes over "/"-joined Flax paths of a kernel within its part.
TARGETS = {
    "attention": r".*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel",  # the UNet's attention projections
    "feed_forward": r".*/ff/net_(0/proj|2)/kernel",
    "resnet_convs": r".*/resnets_\d+/conv[12]/kernel",
    "text_attention": r".*/self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel",  # CLIP text encoders
    "text_mlp": r".*/mlp/fc[12]/kernel",
}
TEXT_TARGETS = ("text_attention", "text_mlp")
# kohya's prefix per part (its text encoders are te1/te2 for SDXL, te for one encoder).
_KOHYA = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_KOHYA_ONE_ENCODER = {"text_encoder": "lora_te"}


@dataclasses.dataclass(frozen=True)
class Spec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # names of TARGETS
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @staticmethod
    def from_config(lora: ml_collections.ConfigDict) -> Spec | None:
        """`config.model.lora`, or None when it is off (rank 0)."""
        if not lora.rank:
            return None
        return Spec(int(lora.rank), float(lora.alpha or lora.rank), tuple(lora.targets), int(lora.seed))


def validate(lora: ml_collections.ConfigDict) -> None:
    int_at_least("model.lora.rank", lora.rank, 0)
    check(lora.alpha >= 0, "model.lora.alpha", lora.alpha, "must be >= 0 (0: the rank, a scale of 1)")
    check(isinstance(lora.targets, (tuple, list)) and lora.targets and all(t in TARGETS for t in lora.targets),
          "model.lora.targets", lora.targets, f"a non-empty tuple of {', '.join(TARGETS)}")
    int_at_least("model.lora.seed", lora.seed, 0)


def _matches(path: tuple[str, ...], patterns: list[re.Pattern]) -> bool:
    return any(p.fullmatch("/".join(path)) for p in patterns)


def init(params: Mapping, targets: tuple[str, ...], rank: int, key: jax.Array) -> dict:
    """Adapters of every kernel of `params` (one part) that `targets` name."""
    patterns = [re.compile(TARGETS[t]) for t in targets]
    out = {}
    for i, (path, w) in enumerate(sorted(flatten_dict(params).items())):
        if not _matches(path, patterns):
            continue
        fan_in = int(np.prod(w.shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        out[path[:-1] + ("down",)] = jax.random.uniform(jax.random.fold_in(key, i), w.shape[:-1] + (rank,),
                                                         jnp.float32, -bound, bound)
        out[path[:-1] + ("up",)] = jnp.zeros((rank, w.shape[-1]), jnp.float32)
    if not out:
        raise ConfigError(f"config.model.lora.targets = {targets}: they name no weight of this model")
    return unflatten_dict(out)


def merge(params: Mapping, adapters: Mapping, scale: float) -> Any:
    """`params` with each adapted kernel replaced by kernel + scale * down @ up."""
    flat = dict(flatten_dict(params))
    for path, a in _pairs(adapters).items():
        w = flat[path + ("kernel",)]
        delta = jnp.tensordot(a["down"].astype(jnp.float32), a["up"].astype(jnp.float32), axes=1)
        flat[path + ("kernel",)] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return unflatten_dict(flat)


def _pairs(adapters: Mapping) -> dict[tuple[str, ...], dict[str, Any]]:
    pairs: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, x in flatten_dict(adapters).items():
        pairs.setdefault(path[:-1], {})[path[-1]] = x
    return pairs


def _module(path: tuple[str, ...]) -> str:
    """The PyTorch module name of the layer at Flax `path` (without its kernel)."""
    return convert.pytorch_key(path + ("kernel",))[: -len(".weight")]


def _torch_down(down: np.ndarray) -> np.ndarray:
    """down [..., in, r] -> lora_A / lora_down weight: [r, in] or a conv's [r, in, kh, kw]."""
    return np.transpose(down, (3, 2, 0, 1)) if down.ndim == 4 else down.T


def _torch_up(up: np.ndarray, conv: bool) -> np.ndarray:
    """up [r, out] -> lora_B / lora_up weight: [out, r] or a 1x1 conv's [out, r, 1, 1]."""
    return up.T[:, :, None, None] if conv else up.T


def _kohya_prefix(part: str, two_encoders: bool) -> str:
    return _KOHYA_ONE_ENCODER.get(part, _KOHYA[part]) if not two_encoders else _KOHYA[part]


def to_files(adapters: Mapping[str, Mapping], spec: Spec, layout: str, two_encoders: bool) -> dict[str, np.ndarray]:
    """The adapters of each part (`{"unet": ..., "text_encoder": ...}`) as one state dict in
    `layout` "diffusers" (PEFT) or "kohya" (see the module docstring)."""
    out = {}
    for part, tree in adapters.items():
        for path, a in _pairs(jax.device_get(tree)).items():
            down, up = np.asarray(a["down"], np.float32), np.asarray(a["up"], np.float32)
            conv = down.ndim == 4
            module = _module(path)
            if layout == "diffusers":
                out[f"{part}.{module}.lora_A.weight"] = _torch_down(down)
                out[f"{part}.{module}.lora_B.weight"] = _torch_up(up * spec.scale, conv)
            else:
                key = f"{_kohya_prefix(part, two_encoders)}_{module.replace('.', '_')}"
                out[f"{key}.lora_down.weight"] = _torch_down(down)
                out[f"{key}.lora_up.weight"] = _torch_up(up, conv)
                out[f"{key}.alpha"] = np.asarray(spec.alpha, np.float32)
    return out


def from_file(tensors: Mapping[str, np.ndarray], templates: Mapping[str, Mapping], two_encoders: bool,
              source: str) -> dict[str, dict]:
    """Adapters per part from a LoRA state dict in either layout, for the adapters
    `templates` of this model (their paths and shapes), with the file's scale folded into
    `up` (so they are used at alpha = rank). A layer the file does not adapt starts at
    zero; a tensor that fits no adapted layer, or another rank, is refused."""
    out, used = {}, set()
    for part, tree in templates.items():
        flat = {}
        for path, a in _pairs(tree).items():
            module = _module(path)
            peft, kohya = f"{part}.{module}", f"{_kohya_prefix(part, two_encoders)}_{module.replace('.', '_')}"
            if f"{peft}.lora_A.weight" in tensors:
                keys, scale = (f"{peft}.lora_A.weight", f"{peft}.lora_B.weight"), 1.0
            elif f"{kohya}.lora_down.weight" in tensors:
                keys = (f"{kohya}.lora_down.weight", f"{kohya}.lora_up.weight")
                rank = tensors[keys[0]].shape[0]
                scale = float(np.asarray(tensors.get(f"{kohya}.alpha", rank))) / rank
                used.add(f"{kohya}.alpha")
            else:
                flat[path + ("down",)] = np.zeros(a["down"].shape, np.float32)
                flat[path + ("up",)] = np.zeros(a["up"].shape, np.float32)
                continue
            used |= set(keys)
            down = np.asarray(tensors[keys[0]], np.float32)
            up = np.asarray(tensors[keys[1]], np.float32)
            down = np.transpose(down, (2, 3, 1, 0)) if down.ndim == 4 else down.T
            up = up.reshape(up.shape[:2]).T * scale
            if down.shape != a["down"].shape or up.shape != a["up"].shape:
                raise ConfigError(f"{source}: {keys[0]} has rank {down.shape[-1]} or a shape this model's "
                                  f"{module} does not take; set config.model.lora.rank to the file's rank")
            flat[path + ("down",)], flat[path + ("up",)] = down, up
        out[part] = unflatten_dict(flat)
    unused = sorted(set(tensors) - used)
    if not used or unused:
        listed = ", ".join(unused[:5]) + (f" ... and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise ConfigError(f"{source}: " + ("no LoRA weight fits this model" if not used else
                          f"weights that fit no layer config.model.lora.targets adapts: {listed}"))
    return out


LORA = "_lora"  # trainable["unet_lora"] holds the adapters of frozen["unet"]


def attach(trainable: dict, frozen: dict, spec: Spec, two_encoders: bool, shapes_only: bool = False,
           init_from: str = "") -> None:
    """Freezes every trainable part (the UNet; the text encoders when they are trained)
    and makes its adapters the trainable `<part>_lora`: fresh, or read from the LoRA file
    `init_from` (either layout), to continue training it."""
    key = jax.random.key(spec.seed)
    for i, part in enumerate(sorted(trainable)):
        targets = tuple(t for t in spec.targets if (t in TEXT_TARGETS) == (part != "unet"))
        if part != "unet" and not targets:  # text encoders trained with LoRA: both sets by default
            targets = TEXT_TARGETS
        base = frozen[part] = trainable.pop(part)
        make = lambda p, k=jax.random.fold_in(key, i), t=targets: init(p, t, spec.rank, k)  # noqa: E731
        trainable[part + LORA] = jax.eval_shape(make, base) if shapes_only else make(base)
    if init_from:
        templates = {k[: -len(LORA)]: v for k, v in trainable.items()}
        loaded = from_file(convert.read_safetensors([init_from]), templates, two_encoders, init_from)
        # The file's scale is folded into `up`: used at this spec's scale, undo it.
        for part, tree in loaded.items():
            trainable[part + LORA] = jax.tree_util.tree_map_with_path(
                lambda p, x: jnp.asarray(x / spec.scale if p[-1].key == "up" else x), tree)


def part(params: Mapping, name: str, spec: Spec | None) -> Any:
    """Part `name` of `params` (frozen and trainable) with its adapters merged, if any."""
    adapters = params.get(name + LORA)
    return params[name] if adapters is None else merge(params[name], adapters, spec.scale)


def merged(params: Mapping, spec: Spec | None) -> dict:
    """Every part with its adapters merged, the adapters themselves gone (a full model)."""
    return {k: part(params, k, spec) for k in params if not k.endswith(LORA)}


def scaled(trainable: Mapping, factor: float) -> dict:
    """`trainable` with every adapter's update multiplied by `factor` (a LoRA strength)."""
    return {k: jax.tree_util.tree_map_with_path(lambda p, x: x * factor if p[-1].key == "up" else x, v)
            if k.endswith(LORA) else v for k, v in trainable.items()}
