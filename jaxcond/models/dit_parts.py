"""What the diffusion-transformer families (`sd3`, `flux`) share: a diffusers-format folder of
a transformer, CLIP and T5 text encoders, their tokenizers and a 16-channel VAE without quant
convs. Each family keeps its own transformer, conditioners and checks that its parts fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcond.checks import ConfigError, check, one_of
from jaxcond.models import convert, load, t5
from jaxcond.models.family import Params

REMAT = ("none", "layers", "full")  # model.remat: nothing, each block, the whole transformer recomputed


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def resolve(source: str, shipped: dict[str, str], parts: Sequence[str], family: str, described: str,
            shapes_only: bool) -> str:
    """The local folder of `source`; with `shapes_only`, the shipped configs of a known hub id.
    `described`: what `family` loads, for the error naming missing parts."""
    if shapes_only:
        path = (os.path.join(load.SHIPPED_DIR, shipped[source]) if source in shipped
                else load.resolve_configs(source))
    else:
        path = load.resolve(source)
    missing = [sub for sub in parts if not os.path.isdir(os.path.join(path, sub))]
    if missing:
        raise ConfigError(f"config.model.source = {source!r} has no {', '.join(s + '/' for s in missing)}: the "
                          f"{family} family loads {described}")
    return path


def read_configs(source: str, path: str, parts: Sequence[str], kind: str) -> dict[str, dict]:
    """Each part's config.json, read before any weights."""
    configs = {}
    for sub in parts:
        file = os.path.join(path, sub, "config.json")
        if not os.path.isfile(file):
            raise ConfigError(f"config.model.source = {source!r} has no {sub}/config.json; is it a diffusers-format "
                              f"{kind} folder?")
        configs[sub] = read_json(file)
    return configs


def load_t5(path: str, folder: str, dtype: jnp.dtype, weights: bool) -> tuple[Any, Params]:
    """transformers' Flax T5 encoder and its params (shapes without `weights`)."""
    from transformers import FlaxT5EncoderModel

    tensors = t5.from_pytorch(load.pytorch_tensors(os.path.join(path, folder), "transformers")) if weights else None
    return load.transformers_part(FlaxT5EncoderModel, os.path.join(path, folder), dtype, tensors, weights)


def load_tokenizers(path: str, clip_folders: Sequence[str], t5_folder: str, weights: bool) -> tuple[list, int]:
    """The CLIP tokenizers then T5's, and the CLIP token limit (tokenizer/'s, the pipelines'
    own). A shapes-only model without vocabularies gets no tokenizers."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    if not (weights or os.path.isfile(os.path.join(path, "tokenizer", "vocab.json"))):
        return [], read_json(os.path.join(path, "tokenizer", "tokenizer_config.json"))["model_max_length"]
    tokenizers = [CLIPTokenizer.from_pretrained(os.path.join(path, f)) for f in clip_folders]
    tokenizers.append(T5TokenizerFast.from_pretrained(os.path.join(path, t5_folder)))
    return tokenizers, tokenizers[0].model_max_length


def tokenize_side_by_side(tokenizers: Sequence[Any], lengths: Sequence[int], captions: Sequence[str]) -> np.ndarray:
    """int32 [B, sum(lengths)]: each tokenizer's ids, padded or cut to its length, side by
    side (zeros without tokenizers: a shapes-only model, compiled, never run)."""
    if not tokenizers:
        return np.zeros((len(captions), sum(lengths)), np.int32)
    return np.concatenate([t(list(captions), padding="max_length", max_length=n, truncation=True,
                             return_tensors="np").input_ids.astype(np.int32)
                           for t, n in zip(tokenizers, lengths)], axis=1)


def overlong_in_any(tokenizers: Sequence[Any], lengths: Sequence[int], captions: Sequence[str]) -> np.ndarray:
    """bool [B]: True where any of the tokenizers cuts the caption at its length."""
    cut = np.zeros(len(captions), bool)
    for t, n in zip(tokenizers, lengths):
        cut |= [len(i) > n for i in t(list(captions), truncation=False, verbose=False).input_ids]
    return cut


def cast_frozen(frozen: Params, frozen_dtype: str) -> Params:
    """The frozen weights (or their shapes) in model.frozen_dtype."""
    if frozen_dtype == "float32":
        return frozen
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) if isinstance(x, jax.ShapeDtypeStruct)
                        else jnp.asarray(x, jnp.bfloat16), frozen)


def load_vae(folder: str, dtype: jnp.dtype, weights: bool, kind: str) -> tuple[Any, dict, float, float, Params]:
    """diffusers' Flax AutoencoderKL, whose 1x1 quant convs SD3's and Flux's VAE do without
    (use_quant_conv=False): they are left out of its params and skipped when applied.
    Returns (vae, which quant convs it has, scaling_factor, shift_factor, params)."""
    from diffusers import FlaxAutoencoderKL

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"{folder}/config.json is missing; is it a diffusers-format {kind} folder?")
    config = read_json(os.path.join(folder, "config.json"))
    if not config.get("mid_block_add_attention", True):
        raise ConfigError(f"{folder}: a VAE without mid-block attention is not supported (diffusers' Flax VAE)")
    vae = FlaxAutoencoderKL.from_config(FlaxAutoencoderKL.load_config(folder), dtype=dtype)
    quant = {k: config.get(f"use_{k}", True) for k in ("quant_conv", "post_quant_conv")}
    template = jax.eval_shape(vae.init_weights, jax.random.key(0))
    template = {k: v for k, v in template.items() if quant.get(k, True)}
    params = convert.from_pytorch(load.pytorch_tensors(folder, "diffusers"), template, source=folder) if weights \
        else template
    return vae, quant, config["scaling_factor"], config.get("shift_factor") or 0.0, params


def check_model(model: ml_collections.ConfigDict, family: str, example: str) -> None:
    """The model.* checks both families make: a folder or hub id (`example`), no single file,
    no text-encoder training or LoRA, a known remat and frozen dtype."""
    check(bool(model.source) and not model.source.endswith(".safetensors"), "model.source", model.source,
          f"the {family} family loads a diffusers-format folder or hub id, e.g. {example}")
    check(not model.get("base"), "model.base", model.get("base"), f"the {family} family reads no single-file "
          "checkpoints; leave it empty")
    check(model.get("train_text_encoder", False) is False, "model.train_text_encoder",
          model.get("train_text_encoder"), f"fine-tuning the text encoders is not implemented for {family}; set False")
    one_of("model.remat", model.get("remat", "none"), REMAT)
    check(model.get("scan_layers", False) is False, "model.scan_layers", model.get("scan_layers"),
          f"scanning layers is implemented for the UNet families only; for {family} set False")
    one_of("model.frozen_dtype", model.get("frozen_dtype", "float32"), ("float32", "bfloat16"))
    rank = model.lora.get("rank", 0) if "lora" in model else 0
    check(rank == 0, "model.lora.rank", rank, f"LoRA is not implemented for {family}; set 0 (a full fine-tune)")
