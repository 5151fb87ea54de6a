"""Single-file checkpoints in the original Stable Diffusion layout <-> diffusers parts.

Most community models ship as one `.safetensors` in the layout of the original
(CompVis / Stability) code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.*` (SD 1.x's CLIP) or, for SDXL,
`conditioner.embedders.0.transformer.*` (CLIP ViT-L) and `conditioner.embedders.1.model.*`
(OpenCLIP ViT-bigG). Such a file has no config: the architecture comes from a diffusers
folder or hub id of the same family (`config.model.base`), whose weights are not needed.

One table of (original prefix, diffusers prefix, renames inside) per part, generated from
that part's diffusers config, serves both directions. Tensors change shape in two places
only: the VAE's attention projections (1x1 convolutions there, linear layers in
diffusers) and OpenCLIP's fused `in_proj` (split into q/k/v in diffusers; its
`text_projection` is stored transposed). Keys are PyTorch keys on both sides
(`jaxcond.models.convert` goes on to Flax).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxcond.models.convert import WeightsMismatch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP = {1: ("cond_stage_model.transformer.",),
        2: ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")}
# Training-time buffers and EMA copies the original checkpoints carry beside the weights.
_IGNORED = re.compile(r"(model_ema\..*|[^.]+|.*position_ids|conditioner\.embedders\.1\.model\.logit_scale)")
_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("nin_shortcut", "conv_shortcut"))
_VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_OPENCLIP_FIXED = (("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                   ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                   ("ln_final.weight", "text_model.final_layer_norm.weight"),
                   ("ln_final.bias", "text_model.final_layer_norm.bias"),
                   ("text_projection", "text_projection.weight"))
_OPENCLIP = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
Table = list[tuple[str, str, tuple[tuple[str, str], ...]]]


def unet_table(cfg: Mapping[str, Any]) -> Table:
    """The UNet of this diffusers config, module by module."""
    r = _UNET_RESNET
    t: Table = [("time_embed.0", "time_embedding.linear_1", ()), ("time_embed.2", "time_embedding.linear_2", ()),
                ("input_blocks.0.0", "conv_in", ()), ("out.0", "conv_norm_out", ()), ("out.2", "conv_out", ()),
                ("middle_block.0", "mid_block.resnets.0", r), ("middle_block.1", "mid_block.attentions.0", ()),
                ("middle_block.2", "mid_block.resnets.1", r)]
    if cfg.get("addition_embed_type") == "text_time":
        t += [("label_emb.0.0", "add_embedding.linear_1", ()), ("label_emb.0.2", "add_embedding.linear_2", ())]
    layers, levels = cfg["layers_per_block"], len(cfg["block_out_channels"])
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            t.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", r))
            if "CrossAttn" in kind:
                t.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", ()))
        if i < levels - 1:
            t.append((f"input_blocks.{(i + 1) * (layers + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", ()))
    for i, kind in enumerate(cfg["up_block_types"]):
        attention = "CrossAttn" in kind
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            t.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", r))
            if attention:
                t.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", ()))
        if i < levels - 1:
            n = i * (layers + 1) + layers
            t.append((f"output_blocks.{n}.{2 if attention else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", ()))
    return t


def vae_table(cfg: Mapping[str, Any]) -> Table:
    """The VAE of this diffusers config; the original decoder numbers its levels upwards."""
    t: Table = [(p, p, ()) for p in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                     "quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        t += [(f"{side}.norm_out", f"{side}.conv_norm_out", ()),
              (f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", _VAE_RESNET),
              (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", _VAE_RESNET),
              (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _VAE_ATTENTION)]
    layers, levels = cfg["layers_per_block"], len(cfg["block_out_channels"])
    for i in range(levels):
        t += [(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
              for j in range(layers)]
        if i < levels - 1:
            t.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", ()))
        u = levels - 1 - i
        t += [(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", _VAE_RESNET)
              for j in range(layers + 1)]
        if i > 0:
            t.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv", ()))
    return t


def _swap(rest: str, pairs: tuple[tuple[str, str], ...], forward: bool) -> tuple[str, tuple[str, str]] | None:
    src, dst = (0, 1) if forward else (1, 0)
    for pair in pairs:
        if rest.startswith(pair[src] + "."):
            return pair[dst] + rest[len(pair[src]):], pair
    return None


def _rename(key: str, table: Table, forward: bool) -> tuple[str, bool] | None:
    """`key` through the table (original -> diffusers if `forward`); None if no entry fits.
    The flag says whether a VAE attention projection was renamed (its tensor reshapes)."""
    src, dst = (0, 1) if forward else (1, 0)
    for entry in table:
        prefix = entry[src] + "."
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if not entry[2]:
            return entry[dst] + "." + rest, False
        hit = _swap(rest, entry[2], forward)
        if hit is not None:
            return entry[dst] + "." + hit[0], entry[2] is _VAE_ATTENTION and hit[1][0] != "norm"
    return None


def _convert_part(tensors: Mapping[str, Any], table: Table, forward: bool, bad: list[str]) -> dict[str, Any]:
    out = {}
    for k, v in tensors.items():
        hit = _rename(k, table, forward)
        if hit is None:
            bad.append(k)
            continue
        name, attention = hit
        if attention and name.endswith("weight"):  # 1x1 conv [C, C, 1, 1] <-> linear [C, C]
            v = v[:, :, 0, 0] if forward else v[:, :, None, None]
        out[name] = v
    return out


def _openclip(tensors: Mapping[str, Any], forward: bool, bad: list[str]) -> dict[str, Any]:
    """OpenCLIP's text tower (original layout) <-> transformers' CLIPTextModelWithProjection."""
    src, dst = (0, 1) if forward else (1, 0)
    fixed = {e[src]: e[dst] for e in _OPENCLIP_FIXED}
    layers = (r"transformer\.resblocks\.(\d+)\.(.+)", r"text_model\.encoder\.layers\.(\d+)\.(.+)")
    target = ("transformer.resblocks.{}.{}", "text_model.encoder.layers.{}.{}")[dst]
    out, qkv = {}, {}
    for k, v in tensors.items():
        m = re.fullmatch(layers[src], k)
        if k in fixed:
            out[fixed[k]] = v.T if "text_projection" in k else v  # stored [D, P] there, [P, D] here
        elif m and forward and m.group(2).startswith("attn.in_proj_"):
            kind = m.group(2)[len("attn.in_proj_"):]
            for c, part in zip("qkv", jnp.split(jnp.asarray(v), 3, axis=0)):
                out[target.format(m.group(1), f"self_attn.{c}_proj.{kind}")] = part
        elif m and not forward and (q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m.group(2))):
            qkv.setdefault((m.group(1), q.group(2)), {})[q.group(1)] = v
        elif m and (hit := _swap(m.group(2), _OPENCLIP, forward)) is not None:
            out[target.format(m.group(1), hit[0])] = v
        else:
            bad.append(k)
    for (layer, kind), parts in qkv.items():
        out[target.format(layer, f"attn.in_proj_{kind}")] = jnp.concatenate([parts[c] for c in "qkv"])
    return out


def to_parts(ckpt: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """An original-layout state dict -> PyTorch state dicts per diffusers part.

    `configs` holds the diffusers configs of `unet` and `vae`, and `text_encoder_2` when
    the family is SDXL's. Keys that belong to no part raise WeightsMismatch.
    """
    encoders = 2 if "text_encoder_2" in configs else 1
    if encoders == 1 and any(k.startswith("cond_stage_model.model.") for k in ckpt):
        raise WeightsMismatch("this single file is Stable Diffusion 2.x's (an OpenCLIP text encoder under "
                              "cond_stage_model.model.), which jaxcond does not read as a single file; "
                              "use the diffusers-format release of the model instead")
    split: dict[str, dict[str, Any]] = {p: {} for p in ("unet", "vae", "text_encoder", "text_encoder_2")}
    prefixes = [(UNET, "unet"), (VAE, "vae")] + list(zip(CLIP[encoders], ("text_encoder", "text_encoder_2")))
    bad: list[str] = []
    for k, v in ckpt.items():
        part = next(((p, name) for p, name in prefixes if k.startswith(p)), None)
        if part is not None:
            split[part[1]][k[len(part[0]):]] = v
        elif not _IGNORED.fullmatch(k):
            bad.append(k)
    clip = split["text_encoder"]
    if clip and not any(k.startswith("text_model.") for k in clip):  # older transformers' key layout
        clip = {"text_model." + k: v for k, v in clip.items()}
    out = {"unet": _convert_part(split["unet"], unet_table(configs["unet"]), True, bad),
           "vae": _convert_part(split["vae"], vae_table(configs["vae"]), True, bad),
           "text_encoder": clip}
    if encoders == 2:
        out["text_encoder_2"] = _openclip(split["text_encoder_2"], True, bad)
    if bad:
        raise WeightsMismatch(f"the single file has {len(bad)} tensors that fit no part of this family, e.g. "
                              f"{sorted(bad)[:10]}; is config.model.base the right family for it?")
    return out


def from_parts(parts: Mapping[str, Mapping[str, Any]], configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """PyTorch state dicts per diffusers part -> one original-layout state dict."""
    encoders = 2 if "text_encoder_2" in parts else 1
    bad: list[str] = []
    out = {UNET + k: v for k, v in _convert_part(parts["unet"], unet_table(configs["unet"]), False, bad).items()}
    out.update({VAE + k: v for k, v in _convert_part(parts["vae"], vae_table(configs["vae"]), False, bad).items()})
    out.update({CLIP[encoders][0] + k: v for k, v in parts["text_encoder"].items()})
    if encoders == 2:
        out.update({CLIP[2][1] + k: v for k, v in _openclip(parts["text_encoder_2"], False, bad).items()})
    if bad:  # a model this module's tables do not describe: refuse rather than drop weights
        raise WeightsMismatch(f"{len(bad)} weights have no place in the original layout, e.g. {sorted(bad)[:10]}")
    return out
