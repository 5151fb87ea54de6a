"""Repro: XLA:CPU computes wrong rows with YNNPACK fusions off on a 2-device SPMD program.

Why jaxcond passes `xla_cpu_experimental_ynn_fusion_type=""` only to one-device CPU
programs (jaxcond/xla.py). A tiny diffusers Flax UNet with cross-attention is applied 10
times in a `lax.scan` to a batch of 60 split over a data=2 mesh of 2 CPU devices. With
jax's default options the result equals plain `jax.jit` on one device (max |diff| ~1e-6);
with the option, rows 0, 1, 30 and 31 (the first two rows of each device's shard) are
wrong by 0.5-0.7 (the same rows every run, the size of the error not: 0.66 and 0.57 in
two runs) while every other row matches; on one device the option matches too. Fewer scan steps (5), a batch of 32, or the
UNet without its cross-attention blocks gave correct rows; so did the scanned attention
or transformer block alone. Found with jaxlib 0.10.2 on a 2-core Sapphire Rapids VM
(2026-12-02).

Run it after a jax upgrade, before letting the option reach multi-device programs:

    .venv/bin/python docs/upstream/xla_cpu_ynn_two_devices.py   # exit 1: still wrong

Pass `--hlo DIR` to also write the failing program's HLO text (for an XLA bug report).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # before jax starts
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import jax  # noqa: E402
import jaxlib  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from diffusers import FlaxUNet2DConditionModel  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

OPTION = {"xla_cpu_experimental_ynn_fusion_type": ""}
B, STEPS = 60, 10


def main() -> int:
    unet = FlaxUNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, cross_attention_dim=64)
    params = unet.init_weights(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (B, 3, 16, 16))
    ctx = jax.random.normal(jax.random.key(2), (B, 12, 64))

    def f(params, x, ctx):
        def body(x, i):
            out = unet.apply({"params": params}, x, 500 - 10 * i, ctx).sample
            return jnp.clip(0.9 * x + 0.1 * out, -3, 3), None
        return jax.lax.scan(body, x, jnp.arange(STEPS))[0]

    ref = np.asarray(jax.jit(f)(params, x, ctx))
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = (jax.device_put(params, rep), jax.device_put(x, rows), jax.device_put(ctx, rows))
    wrong = {}
    for name, opts in (("jax defaults", {}), ("ynn fusions off", OPTION)):
        g = jax.jit(f, in_shardings=(rep, rows, rows), out_shardings=rows, compiler_options=opts)
        if "--hlo" in sys.argv and opts:
            d = sys.argv[sys.argv.index("--hlo") + 1]
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "scan_unet_2dev.hlo.txt"), "w") as fh:
                fh.write(g.lower(*args).compile().as_text())
        diff = np.abs(np.asarray(g(*args)) - ref).reshape(B, -1).max(axis=1)
        wrong[name] = np.nonzero(diff > 1e-3)[0].tolist()
        print(f"{name}: rows differing from one device by > 1e-3: {wrong[name]} (max |diff| {diff.max():.3g})")
    one = np.asarray(jax.jit(f, compiler_options=OPTION)(params, x, ctx))
    ok = np.abs(one - ref).max() < 1e-3
    print(f"ynn fusions off on one device: {'matches' if ok else 'DIFFERS'} (max |diff| {np.abs(one - ref).max():.3g})")
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}")
    return 1 if any(wrong.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
