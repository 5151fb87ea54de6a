"""Finding and reading the parts of a diffusers-format model folder.

A model source is a local folder or, when online, a Hugging Face hub id (downloaded once
into the hub cache). Each part (`unet/`, `vae/`, `text_encoder/`) is read from Flax
`.msgpack` weights when the folder has them, else from PyTorch `.safetensors` weights
(plain, fp16 variant, or sharded with an index) converted by `jaxcond.models.convert`,
without torch. Pickled `.bin` weights are refused with the one-line fix.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxcond.models import convert

# (Flax weights file, stem of the PyTorch weights files) per library.
_FILES = {"diffusers": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
          "transformers": ("flax_model.msgpack", "model")}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HUB_PATTERNS = ["*.json", "*.txt", "*.msgpack", "*.safetensors", "tokenizer*/*"]


def resolve(source: str) -> str:
    """A local folder for `source`: the folder itself, or a hub snapshot of the id."""
    if os.path.isdir(source):
        return source
    if not _HUB_ID.fullmatch(source) or os.path.exists(source):
        raise FileNotFoundError(f"config.model.source = {source!r} is not a folder; give a diffusers-format "
                                "folder (unet/, text_encoder/, tokenizer/, ...) or a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        # Only what jaxcond reads: not the .bin/.ckpt duplicates many repos also carry.
        return snapshot_download(source, allow_patterns=_HUB_PATTERNS)
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


def _check_part(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}/config.json is missing; is {os.path.dirname(folder)!r} "
                                "a diffusers-format model folder?")


def diffusers_part(cls: Any, folder: str, dtype: jnp.dtype) -> tuple[Any, dict]:
    """A diffusers Flax model class's module and params from `folder` (e.g. <model>/unet)."""
    _check_part(folder)
    flax_file, stem = _FILES["diffusers"]
    if os.path.isfile(os.path.join(folder, flax_file)):
        return cls.from_pretrained(folder, dtype=dtype)
    model = cls.from_config(cls.load_config(folder), dtype=dtype)
    template = jax.eval_shape(model.init_weights, jax.random.key(0))
    files = _pytorch_files(folder, stem)
    return model, convert.from_pytorch(convert.read_safetensors(files), template, source=files[0])


def transformers_part(cls: Any, folder: str, dtype: jnp.dtype) -> tuple[Any, dict]:
    """A transformers Flax model (its params not initialised) and its params from `folder`."""
    _check_part(folder)
    flax_file, stem = _FILES["transformers"]
    if os.path.isfile(os.path.join(folder, flax_file)):
        model = cls.from_pretrained(folder, dtype=dtype)
        return model, model.params
    model = cls(cls.config_class.from_pretrained(folder), dtype=dtype, _do_init=False)
    template = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), model.input_shape))
    files = _pytorch_files(folder, stem)
    return model, convert.from_pytorch(convert.read_safetensors(files), template, source=files[0])
