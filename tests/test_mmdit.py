"""The Flax MMDiT against diffusers' PyTorch SD3Transformer2DModel: same outputs from the same
weights for SD3-, SD3.5-large- and SD3.5-medium-style configs, square and non-square latents,
and the weight conversion exact both ways with strict key checks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcond.models import convert, mmdit_convert
from jaxcond.models.convert import WeightsMismatch
from jaxcond.models.mmdit import MMDiT, MMDiTConfig, RMSNorm, layer_norm

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

_TINY = {"sample_size": 16, "patch_size": 2, "in_channels": 16, "num_layers": 3, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 32, "pooled_projection_dim": 32,
         "out_channels": 16, "pos_embed_max_size": 24}
CONFIGS = {
    "sd3": MMDiTConfig(**_TINY),
    "sd35_large": MMDiTConfig(**{**_TINY, "in_channels": 4, "out_channels": 4, "attention_head_dim": 8,
                                 "caption_projection_dim": 16, "pos_embed_max_size": 16}, qk_norm="rms_norm"),
    "sd35_medium": MMDiTConfig(**_TINY, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
# The published shapes (their transformer/config.json), for the key and shape layout only.
_REAL = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "attention_head_dim": 64, "joint_attention_dim": 4096,
         "pooled_projection_dim": 2048, "out_channels": 16}
REAL_CONFIGS = {
    "sd3_medium": {**_REAL, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                   "pos_embed_max_size": 192},
    "sd35_large": {**_REAL, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                   "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    "sd35_medium": {**_REAL, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                    "pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))},
}
# Parity bound relative to the output's scale, as for the UNet.
RTOL_OF_SCALE = 1e-4


@functools.cache
def torch_model(name: str):
    """The PyTorch model with every parameter random (the zero-initialised gates and
    projections too, so that every path carries signal): matrices ~ 1/sqrt(fan_in), norm
    weights ~ 1, biases small."""
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**dataclasses.asdict(CONFIGS[name])).eval()
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


def inputs(config: MMDiTConfig, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, config.in_channels, height, width)).astype(np.float32),
            rng.standard_normal((2, 7, config.joint_attention_dim)).astype(np.float32),
            rng.standard_normal((2, config.pooled_projection_dim)).astype(np.float32),
            np.array([3.0, 741.5], np.float32))


def torch_forward(model, args: tuple[np.ndarray, ...]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in args)).sample.numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    diff = float(np.abs(got - want).max())
    assert diff <= RTOL_OF_SCALE * max(1.0, float(np.abs(want).max())), (diff, float(np.abs(want).max()))
    return diff


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_pytorch(name):
    config = CONFIGS[name]
    params = mmdit_convert.from_diffusers(state_dict(name), config)
    args = inputs(config, 16, 16)
    got = np.asarray(jax.jit(MMDiT(config).apply)({"params": params}, *args))
    assert_close(got, torch_forward(torch_model(name), args))


# Odd patch counts (5 x 11), where the centre crop rounds down; a whole side of the table (24 x 4).
@pytest.mark.parametrize("height,width", [(10, 22), (48, 8)])
def test_non_square_latents_crop_the_position_table_as_diffusers(height, width):
    config = CONFIGS["sd35_medium"]
    params = mmdit_convert.from_diffusers(state_dict("sd35_medium"), config)
    args = inputs(config, height, width, seed=1)
    got = np.asarray(jax.jit(MMDiT(config).apply)({"params": params}, *args))
    assert_close(got, torch_forward(torch_model("sd35_medium"), args))


def test_norms_match_diffusers_where_eps_shows():
    """Inputs whose variance is near eps, where 1e-5 instead of diffusers' 1e-6 would show."""
    model = torch_model("sd35_medium")
    x = np.random.default_rng(3).standard_normal((2, 5, 32)).astype(np.float32) * 1e-3
    first, last = model.transformer_blocks[0], model.transformer_blocks[-1]
    for norm in (first.norm1.norm, first.norm1_context.norm, first.norm2, first.norm2_context,
                 last.norm1_context.norm, model.norm_out.norm):
        with torch.no_grad():
            assert_close(np.asarray(layer_norm(jnp.asarray(x))), norm(torch.from_numpy(x)).numpy())
    heads = x.reshape(2, 5, 2, 16)
    for norm in (first.attn.norm_q, first.attn.norm_added_k, first.attn2.norm_k):
        with torch.no_grad():
            want = norm(torch.from_numpy(heads)).numpy()
        assert_close(np.asarray(RMSNorm().apply({"params": {"scale": norm.weight.detach().numpy()}}, heads)), want)


def test_latents_beyond_the_position_table_are_refused():
    config = CONFIGS["sd3"]
    params = mmdit_convert.param_shapes(config)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        jax.eval_shape(MMDiT(config).apply, {"params": params}, *inputs(config, 50, 16))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_exact(name):
    sd = state_dict(name)
    back = mmdit_convert.to_diffusers(mmdit_convert.from_diffusers(sd, CONFIGS[name]), CONFIGS[name])
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_flax_weights_load_into_pytorch_strictly_and_agree():
    """The export direction on its own: Flax-initialised params, written for PyTorch."""
    config = CONFIGS["sd35_medium"]
    args = inputs(config, 16, 12, seed=2)
    params = jax.jit(MMDiT(config).init)(jax.random.key(3), *args)["params"]
    model = diffusers.SD3Transformer2DModel(**dataclasses.asdict(config)).eval()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in mmdit_convert.to_diffusers(params, config).items()},
                          strict=True)
    assert_close(np.asarray(jax.jit(MMDiT(config).apply)({"params": params}, *args)), torch_forward(model, args))


def test_missing_unexpected_and_misshaped_keys_are_listed():
    config, sd = CONFIGS["sd3"], state_dict("sd3")
    del sd["transformer_blocks.1.attn.add_k_proj.bias"]
    sd["transformer_blocks.3.attn.to_q.weight"] = np.zeros((32, 32), np.float32)
    sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1]
    del sd["pos_embed.pos_embed"]
    with pytest.raises(WeightsMismatch) as e:
        mmdit_convert.from_diffusers(sd, config, source="model.safetensors")
    message = str(e.value)
    for part in ("model.safetensors", "missing (1)", "transformer_blocks.1.attn.add_k_proj.bias",
                 "unexpected (1)", "transformer_blocks.3.attn.to_q.weight", "wrong shape (1)", "proj_out.weight",
                 "pos_embed.pos_embed (the position table, shape (1, 576, 32)) is missing"):
        assert part in message, (part, message)


def test_a_position_table_of_another_config_is_refused():
    sd = state_dict("sd3")
    other = dataclasses.replace(CONFIGS["sd3"], sample_size=32)  # same shapes, a different table
    with pytest.raises(WeightsMismatch, match=r"pos_embed.pos_embed differs .* sample_size=32"):
        mmdit_convert.from_diffusers(sd, other)
    # A bfloat16 file's table is within its own rounding.
    sd["pos_embed.pos_embed"] = jnp.asarray(sd["pos_embed.pos_embed"], jnp.bfloat16)
    mmdit_convert.from_diffusers(sd, CONFIGS["sd3"])


def test_exporting_params_of_another_config_is_refused():
    params = mmdit_convert.from_diffusers(state_dict("sd3"), CONFIGS["sd3"])
    with pytest.raises(WeightsMismatch, match="missing"):
        mmdit_convert.to_diffusers(params, CONFIGS["sd35_medium"])


def test_bfloat16_compute_stays_near_float32():
    config = CONFIGS["sd35_medium"]
    params = mmdit_convert.from_diffusers(state_dict("sd35_medium"), config)
    args = inputs(config, 16, 16)
    want = np.asarray(jax.jit(MMDiT(config).apply)({"params": params}, *args))
    got = jax.jit(MMDiT(config, dtype=jnp.bfloat16).apply)({"params": params}, *args)
    assert got.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got, np.float32) - want).max() <= 0.05 * np.abs(want).max()


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_config_layouts_match_diffusers(name):
    """Every key and shape of the full-size models, without allocating either."""
    config = MMDiTConfig.from_diffusers({"_class_name": "SD3Transformer2DModel", **REAL_CONFIGS[name]})
    assert MMDiTConfig.from_diffusers(config.to_diffusers()) == config
    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel(**REAL_CONFIGS[name])
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {"pos_embed.pos_embed": (1, config.pos_embed_max_size ** 2, config.inner_dim)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(mmdit_convert.param_shapes(config))[0]:
        names = tuple(p.key for p in path)
        shape = leaf.shape
        if names[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        got[convert.pytorch_key(names)] = tuple(shape)
    assert got == want


def test_config_refuses_what_is_not_implemented():
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig(**{**_TINY, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="caption_projection_dim"):
        MMDiTConfig(**{**_TINY, "caption_projection_dim": 48})
    with pytest.raises(ValueError, match="unknown fields"):
        MMDiTConfig.from_diffusers({**_TINY, "num_heads": 3})
