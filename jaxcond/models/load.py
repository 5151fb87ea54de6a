"""Finding and reading the parts of a diffusers-format model folder.

A model source is a local folder or, when online, a Hugging Face hub id (downloaded once
into the hub cache), or a single-file checkpoint in the original Stable Diffusion layout
with a `base` folder or hub id of its family for the configs. Each part (`unet/`, `vae/`, `text_encoder/`) is read from Flax
`.msgpack` weights when the folder has them, else from PyTorch `.safetensors` weights
(plain, fp16 variant, or sharded with an index) converted by `jaxcond.models.convert`,
without torch. Pickled `.bin` weights are refused with the one-line fix.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcond.models import convert, single_file as sf

# (Flax weights file, stem of the PyTorch weights files) per library.
_FILES = {"diffusers": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
          "transformers": ("flax_model.msgpack", "model")}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_CONFIG_PATTERNS = ["*.json", "*.txt", "tokenizer*/*"]
# Each part's weights in the layouts read here; not the repo-root single files and fp16
# duplicates many repos also carry (SDXL's would add 14 GB).
_WEIGHT_PATTERNS = ["*/diffusion_pytorch_model.safetensors", "*/model.safetensors", "*/*.safetensors.index.json",
                    "*/*-of-*.safetensors", "*/*.msgpack"]


# The config files (no weights, no tokenizer vocabularies) of these hub models ship with
# jaxcond, so their parameter shapes are known offline (`jaxcond plan`).
SHIPPED = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
           "stabilityai/stable-diffusion-2-1": "sd21", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl"}
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "configs")


def resolve_configs(source: str) -> str:
    """A folder with `source`'s configs (weights may be missing): a local folder, the
    shipped configs of a known hub id, or the hub's (configs only)."""
    if os.path.isdir(source):
        return source
    if source in SHIPPED:
        return os.path.join(SHIPPED_DIR, SHIPPED[source])
    return resolve(source, weights=False)


def resolve(source: str, weights: bool = True) -> str:
    """A local folder for `source`: the folder itself, or a hub snapshot of the id (without
    weights when only the configs and tokenizers are needed)."""
    if os.path.isdir(source):
        return source
    if not _HUB_ID.fullmatch(source) or os.path.exists(source):
        raise FileNotFoundError(f"config.model.source = {source!r} is not a folder; give a diffusers-format "
                                "folder (unet/, text_encoder/, tokenizer/, ...) or a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=_CONFIG_PATTERNS + (_WEIGHT_PATTERNS if weights else []))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise FileNotFoundError(
            f"config.model.source = {source!r} is not a local folder and could not be downloaded from the "
            f"hub ({type(e).__name__}: {e}). Download it where there is a network (huggingface-cli download "
            f"{source}) and point config.model.source at the folder.") from e


def _pytorch_files(folder: str, stem: str) -> list[str]:
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            parts = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, p) for p in parts]
    pickled = [n for n in sorted(os.listdir(folder)) if n.endswith(".bin")]
    if pickled:
        raise FileNotFoundError(
            f"{os.path.join(folder, pickled[0])} is a pickled PyTorch checkpoint, which jaxcond does not read "
            "(it needs torch and can run code when unpickled). Convert it once to safetensors where torch is "
            "installed, e.g. `UNet2DConditionModel.from_pretrained(folder).save_pretrained(folder)` for a "
            "diffusers part or `CLIPTextModel.from_pretrained(folder).save_pretrained(folder)` for a text encoder.")
    raise FileNotFoundError(f"{folder} has no weights: expected {stem}.safetensors, its fp16 variant or "
                            "sharded index, or Flax .msgpack weights")


def pytorch_tensors(folder: str, library: str) -> dict[str, jax.Array]:
    """The PyTorch tensors of part `folder` (`library`: "diffusers" or "transformers"), as
    `diffusers_part` and `transformers_part` would read them, for a model whose keys need
    a fix before `convert.from_pytorch` (then pass them as `tensors`)."""
    _check_part(folder)
    return convert.read_safetensors(_pytorch_files(folder, _FILES[library][1]))


def _check_part(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}/config.json is missing; is {os.path.dirname(folder)!r} "
                                "a diffusers-format model folder?")


def _params(library: str, folder: str, template: Any, tensors: dict | None) -> dict:
    if tensors is not None:  # this part's share of a single-file checkpoint
        return convert.from_pytorch(tensors, template, source=f"the single file's {os.path.basename(folder)}")
    files = _pytorch_files(folder, _FILES[library][1])
    return convert.from_pytorch(convert.read_safetensors(files), template, source=files[0])


def diffusers_part(cls: Any, folder: str, dtype: jnp.dtype, tensors: dict | None = None,
                   weights: bool = True) -> tuple[Any, dict]:
    """A diffusers Flax model class's module and params from `folder` (e.g. <model>/unet),
    or from `tensors` (PyTorch keys) with only the folder's config; without `weights`, the
    params' shapes (jax.ShapeDtypeStruct) from the config alone."""
    _check_part(folder)
    if not weights:
        model = cls.from_config(cls.load_config(folder), dtype=dtype)
        return model, jax.eval_shape(model.init_weights, jax.random.key(0))
    flax_file = os.path.join(folder, _FILES["diffusers"][0])
    if tensors is None and os.path.isfile(flax_file):
        model, params = _read_flax(flax_file, lambda: cls.from_pretrained(folder, dtype=dtype))
    else:
        model, params = cls.from_config(cls.load_config(folder), dtype=dtype), None
    template = jax.eval_shape(model.init_weights, jax.random.key(0))
    if params is None:
        return model, _params("diffusers", folder, template, tensors)
    # diffusers only logs (and jaxcond silences) weights missing from the file, which would
    # then fail deep inside the first step: refuse the file, listing them.
    return model, convert.check_fits(_uncommitted(params), template, source=flax_file)


def _read_flax(flax_file: str, read: Callable[[], tuple[Any, dict]]) -> tuple[Any, dict]:
    """`read()` of a Flax weights file; the library's own shape check (a ValueError) as
    WeightsMismatch, an error for the user rather than a traceback."""
    try:
        return read()
    except ValueError as e:
        raise convert.WeightsMismatch(f"{flax_file} does not fit the model its config describes: {e}") from None


def _uncommitted(params: dict) -> dict:
    """diffusers and transformers commit the weights they read to the CPU device, from where
    a multi-host device_put cannot place them; uncommitted (like every other part's) they go
    wherever they are put."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)


def transformers_part(cls: Any, folder: str, dtype: jnp.dtype, tensors: dict | None = None,
                      weights: bool = True) -> tuple[Any, dict]:
    """A transformers Flax model (its params not initialised) and its params, as above."""
    _check_part(folder)
    flax_file = os.path.join(folder, _FILES["transformers"][0])
    if weights and tensors is None and os.path.isfile(flax_file):
        # _do_init=False: transformers would otherwise initialise every weight it then
        # replaces, op by op (~100 small compiles), and fill missing ones with random values.
        model, params = _read_flax(flax_file, lambda: cls.from_pretrained(folder, dtype=dtype, _do_init=False))
        return model, convert.check_fits(_uncommitted(params), model.params_shape_tree, source=flax_file)
    model = cls(cls.config_class.from_pretrained(folder), dtype=dtype, _do_init=False)
    template = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), model.input_shape))
    return model, (_params("transformers", folder, template, tensors) if weights else template)


def single_file(path: str, base: str) -> tuple[str, dict[str, dict]]:
    """An original-layout checkpoint: the folder of `base` (configs, tokenizers) and the
    file's tensors per diffusers part (`jaxcond.models.single_file`)."""
    folder = resolve(base, weights=False)
    configs = {}
    for sub in ("unet", "vae", "text_encoder_2"):
        if os.path.isdir(os.path.join(folder, sub)):
            _check_part(os.path.join(folder, sub))
            with open(os.path.join(folder, sub, "config.json")) as f:
                configs[sub] = json.load(f)
    if "vae" not in configs:
        raise FileNotFoundError(f"config.model.base = {base!r} has no vae/: a single-file checkpoint is a "
                                "latent model; give the diffusers folder or hub id of its family")
    return folder, sf.to_parts(convert.read_safetensors([path]), configs)
