"""The Flax Flux transformer against diffusers' PyTorch FluxTransformer2DModel: same outputs
from the same weights for schnell- and dev-style (guidance-embedding) configs on non-square
latents, FluxPipeline's packing and position ids, and the weight conversion exact both ways
with strict key checks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcond.models import convert, flux_convert
from jaxcond.models.convert import WeightsMismatch
from jaxcond.models.flux import (
    Flux,
    FluxConfig,
    image_ids,
    pack_latents,
    rope_angles,
    text_ids,
    unpack_latents,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

LATENT_CHANNELS = 4  # the VAE's; a packed token has 4x as many
_TINY = {"patch_size": 1, "in_channels": 4 * LATENT_CHANNELS, "num_layers": 2, "num_single_layers": 2,
         "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 24, "pooled_projection_dim": 20,
         "axes_dims_rope": (4, 6, 6)}
CONFIGS = {"schnell": FluxConfig(**_TINY), "dev": FluxConfig(**_TINY, guidance_embeds=True)}
# The published shapes (FLUX.1-schnell's and FLUX.1-dev's transformer/config.json), for the
# key and shape layout only.
_REAL = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0", "attention_head_dim": 128,
         "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
         "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
REAL_CONFIGS = {"schnell": {**_REAL, "guidance_embeds": False}, "dev": {**_REAL, "guidance_embeds": True}}
# Parity bound relative to the output's scale, as for the UNet and the MMDiT.
RTOL_OF_SCALE = 1e-4
LATENT_SIDES = (6, 10)  # non-square: a 3 x 5 grid of packed tokens
TEXT_TOKENS = 7


@functools.cache
def torch_model(name: str):
    """The PyTorch model with every parameter random (so that every path carries signal):
    matrices ~ 1/sqrt(fan_in), norm weights ~ 1, biases small."""
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**dataclasses.asdict(CONFIGS[name])).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in key:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


def state_dict(name: str) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in torch_model(name).state_dict().items()}


def inputs(config: FluxConfig, seed: int = 0, ids: str = "pipeline") -> dict[str, np.ndarray]:
    """The model's arguments as FluxPipeline builds them; `ids="all_axes"` moves every id axis
    off zero (as Kontext's reference images do with the first), so each axis's rotary share shows."""
    rng = np.random.default_rng(seed)
    h, w = LATENT_SIDES
    latents = rng.standard_normal((2, LATENT_CHANNELS, h, w)).astype(np.float32)
    img, txt = np.asarray(image_ids(h // 2, w // 2)), np.asarray(text_ids(TEXT_TOKENS))
    if ids == "all_axes":
        img = img + np.array([1.0, 2.0, 3.0], np.float32)
        txt = rng.integers(0, 9, txt.shape).astype(np.float32)
    context = rng.standard_normal((2, TEXT_TOKENS, config.joint_attention_dim)).astype(np.float32)
    args = {"hidden_states": np.asarray(pack_latents(jnp.asarray(latents))), "encoder_hidden_states": context,
            "pooled_projections": rng.standard_normal((2, config.pooled_projection_dim)).astype(np.float32),
            "timestep": np.array([0.003, 0.7415], np.float32), "img_ids": img, "txt_ids": txt}
    if config.guidance_embeds:
        args["guidance"] = np.array([3.5, 1.0], np.float32)
    return args


def torch_forward(model, args: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.array(v)) for k, v in args.items()}).sample.numpy()


def flax_forward(config: FluxConfig, params, args: dict[str, np.ndarray], dtype=jnp.float32) -> jax.Array:
    return jax.jit(Flux(config, dtype=dtype).apply)({"params": params}, **args)


def assert_close(got: np.ndarray, want: np.ndarray) -> float:
    """Within RTOL_OF_SCALE of the output's scale. Both sides are float32; the largest share of
    the difference is the sinusoid of guidance x 1000 (angles in the thousands of radians)."""
    assert got.shape == want.shape
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(f"max |flax - torch| = {diff:.3g}, output scale {scale:.3g}")
    assert diff <= RTOL_OF_SCALE * max(1.0, scale), (diff, scale)
    return diff


@pytest.mark.parametrize("name,ids", [("schnell", "pipeline"), ("dev", "pipeline"), ("dev", "all_axes")])
def test_matches_diffusers_pytorch(name, ids):
    config = CONFIGS[name]
    params = flux_convert.from_diffusers(state_dict(name), config)
    args = inputs(config, ids=ids)
    got = np.asarray(flax_forward(config, params, args))
    assert got.shape == (2, 15, config.out_channels)
    assert_close(got, torch_forward(torch_model(name), args))


def test_packing_and_ids_match_flux_pipeline():
    pipeline = diffusers.FluxPipeline
    h, w = LATENT_SIDES
    latents = np.random.default_rng(1).standard_normal((2, LATENT_CHANNELS, h, w)).astype(np.float32)
    packed = pipeline._pack_latents(torch.from_numpy(latents), 2, LATENT_CHANNELS, h, w).numpy()
    assert np.array_equal(np.asarray(pack_latents(jnp.asarray(latents))), packed)
    vae_factor = 8  # the pipeline's unpack takes image pixels
    want = pipeline._unpack_latents(torch.from_numpy(packed), h * vae_factor, w * vae_factor, vae_factor).numpy()
    assert np.array_equal(want, latents)
    assert np.array_equal(np.asarray(unpack_latents(jnp.asarray(packed), h, w)), want)
    ids = pipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32).numpy()
    assert np.array_equal(np.asarray(image_ids(h // 2, w // 2)), ids)
    with pytest.raises(ValueError, match="even sides"):
        pack_latents(jnp.zeros((1, 4, 5, 6)))
    with pytest.raises(ValueError, match="do not unpack"):
        unpack_latents(jnp.asarray(packed), h, w + 2)


def test_rotary_embedding_matches_diffusers_at_large_positions():
    """Positions of a 2048-pixel image's token grid (128 per side), where the float32 products
    (diffusers multiplies in float64) differ most."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes = REAL_CONFIGS["dev"]["axes_dims_rope"]
    ids = np.concatenate([np.asarray(text_ids(3)), np.asarray(image_ids(128, 128))])
    want_cos, want_sin = (t.numpy() for t in FluxPosEmbed(10000, axes)(torch.from_numpy(ids)))
    angles = np.asarray(jax.jit(rope_angles, static_argnums=1)(jnp.asarray(ids), tuple(axes)))
    # diffusers repeats each pair's value for both of its channels
    assert np.abs(np.repeat(np.cos(angles), 2, axis=1) - want_cos).max() < 5e-5
    assert np.abs(np.repeat(np.sin(angles), 2, axis=1) - want_sin).max() < 5e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_exact(name):
    sd = state_dict(name)
    back = flux_convert.to_diffusers(flux_convert.from_diffusers(sd, CONFIGS[name]), CONFIGS[name])
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_flax_weights_load_into_pytorch_strictly_and_agree():
    """The export direction on its own: Flax-initialised params, written for PyTorch."""
    config = CONFIGS["dev"]
    args = inputs(config, seed=2)
    params = jax.jit(Flux(config).init)(jax.random.key(3), **args)["params"]
    model = diffusers.FluxTransformer2DModel(**dataclasses.asdict(config)).eval()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in flux_convert.to_diffusers(params, config).items()},
                          strict=True)
    assert_close(np.asarray(flax_forward(config, params, args)), torch_forward(model, args))


def test_missing_unexpected_and_misshaped_keys_are_listed():
    config, sd = CONFIGS["dev"], state_dict("dev")
    del sd["single_transformer_blocks.1.attn.norm_k.weight"]
    sd["transformer_blocks.2.attn.to_q.weight"] = np.zeros((32, 32), np.float32)
    sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1]
    with pytest.raises(WeightsMismatch) as e:
        flux_convert.from_diffusers(sd, config, source="diffusion_pytorch_model.safetensors")
    message = str(e.value)
    for part in ("diffusion_pytorch_model.safetensors", "missing (1)", "single_transformer_blocks.1.attn.norm_k.weight",
                 "unexpected (1)", "transformer_blocks.2.attn.to_q.weight", "wrong shape (1)",
                 "proj_out.weight: checkpoint (16, 31), model wants (16, 32)"):
        assert part in message, (part, message)


def test_the_other_guidance_variant_and_the_original_layout_are_named():
    with pytest.raises(WeightsMismatch, match=r"(?s)unexpected \(4\).*has a guidance embedder.*guidance_embeds=False"):
        flux_convert.from_diffusers(state_dict("dev"), CONFIGS["schnell"])
    with pytest.raises(WeightsMismatch, match=r"(?s)missing \(4\).*lacks a guidance embedder.*guidance_embeds=True"):
        flux_convert.from_diffusers(state_dict("schnell"), CONFIGS["dev"])
    original = {"double_blocks.0.img_attn.qkv.weight": np.zeros((96, 32), np.float32)}
    with pytest.raises(WeightsMismatch, match="Black Forest Labs' original layout"):
        flux_convert.from_diffusers(original, CONFIGS["dev"])


def test_exporting_params_of_another_config_is_refused():
    params = flux_convert.from_diffusers(state_dict("schnell"), CONFIGS["schnell"])
    with pytest.raises(WeightsMismatch, match="missing"):
        flux_convert.to_diffusers(params, CONFIGS["dev"])


def test_bfloat16_compute_stays_near_float32():
    """bfloat16 compute from float32 params, and from params cast to bfloat16 (train.param_dtype)."""
    config = CONFIGS["dev"]
    params = flux_convert.from_diffusers(state_dict("dev"), config)
    args = inputs(config)
    want = np.asarray(flax_forward(config, params, args))
    for p in (params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)):
        got = flax_forward(config, p, args, dtype=jnp.bfloat16)
        assert got.dtype == jnp.bfloat16
        assert np.abs(np.asarray(got, np.float32) - want).max() <= 0.05 * np.abs(want).max()


def test_inputs_that_do_not_fit_are_refused_by_name():
    config = CONFIGS["dev"]
    params = flux_convert.param_shapes(config)
    args = inputs(config)

    def shapes(**change):
        return jax.eval_shape(Flux(config).apply, {"params": params}, **{**args, **change})

    with pytest.raises(ValueError, match="pass guidance"):
        shapes(guidance=None)
    with pytest.raises(ValueError, match="no guidance embedding"):
        jax.eval_shape(Flux(CONFIGS["schnell"]).apply, {"params": flux_convert.param_shapes(CONFIGS["schnell"])},
                       **args)
    with pytest.raises(ValueError, match=r"img_ids of shape \(1, 15, 3\)"):
        shapes(img_ids=args["img_ids"][None])
    with pytest.raises(ValueError, match=r"txt_ids of shape \(6, 3\); want \(7, 3\)"):
        shapes(txt_ids=args["txt_ids"][:6])
    # A scalar timestep and guidance apply to the whole batch.
    assert shapes(timestep=np.float32(0.5), guidance=np.float32(3.5)).shape == (2, 15, config.out_channels)


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_config_layouts_match_diffusers(name):
    """Every key and shape of the full-size models, without allocating either."""
    config = FluxConfig.from_diffusers(REAL_CONFIGS[name])
    assert config.out_channels == 64
    assert FluxConfig.from_diffusers(config.to_diffusers()) == config
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(**{k: v for k, v in REAL_CONFIGS[name].items() if k[0] != "_"})
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(flux_convert.param_shapes(config))[0]:
        names = tuple(p.key for p in path)
        got[convert.pytorch_key(names)] = leaf.shape[::-1] if names[-1] == "kernel" else leaf.shape
    assert got == want


def test_config_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="sums to 14"):
        FluxConfig(**{**_TINY, "axes_dims_rope": (4, 6, 4)})
    with pytest.raises(ValueError, match="positive even share"):
        FluxConfig(**{**_TINY, "axes_dims_rope": (5, 5, 6)})
    with pytest.raises(ValueError, match="unknown fields"):
        FluxConfig.from_diffusers({**_TINY, "num_heads": 3})
    assert FluxConfig.from_diffusers({**_TINY, "out_channels": None}).out_channels == 16
