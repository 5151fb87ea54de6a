"""Shared fixtures. Tests run on the CPU with 8 simulated devices and a persistent
compilation cache inside the checkout, so repeated compiles (also in subprocesses) are cheap."""

import copy
import dataclasses
import os
import pathlib
import shutil
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402, F401  (imported after the XLA flags above are set)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from configs import demo  # noqa: E402
from jaxcond.data import demo as demo_data  # noqa: E402


# The files that take longest (pytest --durations), longest first. With pytest-xdist whole
# files go to whichever worker is free, in collection order; a long file handed out last
# would leave the other worker idle at the end.
LONGEST_FIRST = ("test_fault.py", "test_gcs_run.py", "test_kills.py", "test_train.py", "test_scale.py", "test_cache.py",
                 "test_diffusers_pipeline.py", "test_families.py",
                 "test_pipeline.py", "test_latent.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order


def tiny_config() -> ml_collections.ConfigDict:
    """The demo config shrunk for tests: same model family and contract, seconds per run."""
    c = demo.get_config()
    c.model.demo.unet_channels = (32, 32)
    c.model.demo.text_width = 16
    c.model.demo.attention_heads = 2
    c.model.demo.text_heads = 2
    c.data.num_records = 256
    c.train.global_batch = 16
    c.train.steps = 8
    c.train.log_every = 1
    c.train.sample_every = 0
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 4
    c.sample.num_prompts = 2
    c.sample.per_prompt = 2
    c.sample.steps = 3
    return c


def fsdp_matches(loss, params, want, want_grads):
    """`loss(params)` and its gradients with `params` split by jaxcond's FSDP rule over 8
    devices and gathered where used (`sharding.gathering`) equal `want` and `want_grads` to
    float rounding. Returns the gathered loss's jaxpr, to see where it gathers."""
    from jaxcond import sharding

    mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
    params = jax.device_put(params, sharding.param_shardings(mesh, params, 0))

    def gathered(p):
        with sharding.gathering(sharding.replicated(mesh)):
            return loss(p)

    got, grads = jax.jit(jax.value_and_grad(gathered))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), grads, want_grads)
    return jax.make_jaxpr(gathered)(params)


def start_two_processes(cfg_path, workdir: str, env: dict, logs: list, record_dir=None) -> list:
    """The two processes of one run (tests/multihost_worker.py, gloo on a free local port),
    each writing its output to its file in `logs` (a full pipe would stall them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), str(i), "2", str(port),
                 str(cfg_path), str(workdir), *([str(record_dir)] if record_dir else [])],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def make_data(cfg: ml_collections.ConfigDict, family, use_cache: bool = True):
    """The training data of a whole config, as `jaxcond train` builds it."""
    from jaxcond.data import sources

    return sources.make_data(cfg.data, cfg.seed, cfg.train.global_batch, family, workers=cfg.loader.workers,
                             train_text_encoder=cfg.model.train_text_encoder, use_cache=use_cache)


def build_cache(cfg: ml_collections.ConfigDict, family, directory: str) -> dict:
    """`jaxcond cache` of a whole config into `directory`."""
    from jaxcond.data import sources

    return sources.build_cache(cfg.data, cfg.seed, cfg.train.global_batch, family, directory,
                               workers=cfg.loader.workers, train_text_encoder=cfg.model.train_text_encoder)


def write_shards(cfg: ml_collections.ConfigDict, out: str, num_shards: int) -> dict:
    """`jaxcond shards` of a whole config into `out`."""
    from jaxcond.data import sources

    return sources.write_shards(cfg.data, cfg.seed, cfg.train.global_batch, out, num_shards,
                                workers=cfg.loader.workers)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny demo model folder (diffusers layout) built once per session.

    One UNet level (no down- or up-sampling): most of the suite's time is compiling train
    steps of this model, which a level fewer compiles in ~0.8x the time and traces in ~0.55x.
    The models that the weight, export, single-file and family tests build from
    `config.model.demo` keep its two levels, and with them the samplers' conversions."""
    from jaxcond.models import demo as demo_model

    path = str(tmp_path_factory.mktemp("model"))
    c = tiny_config()
    c.model.demo.unet_channels = (32,)
    demo_model.build(path, c.model.demo, c.data.resolution, c.model.demo.init_seed)
    return path


@pytest.fixture(scope="session")
def config(model_dir) -> ml_collections.ConfigDict:
    """tiny_config() pointing at the session's model folder (copy before changing)."""
    c = tiny_config()
    c.model.source = model_dir
    return c


@pytest.fixture(scope="session")
def deep_model_dir(model_dir, tmp_path_factory):
    """The demo folder with 3 transformer blocks per spatial transformer (SDXL has 2 and 10)."""
    import json

    from diffusers import FlaxUNet2DConditionModel

    path = str(tmp_path_factory.mktemp("deep"))
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    unet_dir = f"{path}/unet"
    config = FlaxUNet2DConditionModel.load_config(unet_dir)
    config["transformer_layers_per_block"] = 3
    unet = FlaxUNet2DConditionModel.from_config(config)
    params = unet.init_weights(jax.random.key(1))
    for name in os.listdir(unet_dir):
        os.remove(os.path.join(unet_dir, name))
    unet.save_pretrained(unet_dir, params=params)
    assert json.load(open(f"{unet_dir}/config.json"))["transformer_layers_per_block"] == 3
    return path


@pytest.fixture(scope="session")
def run_config(config) -> ml_collections.ConfigDict:
    """The config of the session's shared training runs (below): `config` with a caption
    dropout rate high enough that every step drops several positions. Tests that compile
    its train step on 8 devices share one compiled program (the persistent cache)."""
    c = copy.deepcopy(config)
    c.dropout.groups.caption.rate = 0.4
    return c


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished `train()` call: its workdir (read it, never write into it: other tests
    share it; copy it first to resume) and what `train()` returned."""

    workdir: pathlib.Path
    out: dict

    def copy_to(self, dest) -> pathlib.Path:
        shutil.copytree(self.workdir, dest)
        return pathlib.Path(dest)


@pytest.fixture(scope="session")
def reference_run(run_config, tmp_path_factory) -> TrainedRun:
    """`run_config` trained uninterrupted to step 8 (checkpoints at 4 and 8, final samples),
    once per session: the reference of the resume tests, and the run that export, sampling
    and the masks log are checked on."""
    from jaxcond import train as train_lib

    workdir = tmp_path_factory.mktemp("reference_run")
    return TrainedRun(workdir, train_lib.train(run_config, str(workdir), progress=False))


@pytest.fixture(scope="session")
def interrupted_run(run_config, tmp_path_factory) -> TrainedRun:
    """The same run stopped after step 4 and its checkpoint, as an interruption would leave
    it. Tests resume from a copy (`copy_to`)."""
    from jaxcond import train as train_lib

    workdir = tmp_path_factory.mktemp("interrupted_run")
    return TrainedRun(workdir, train_lib.train(run_config, str(workdir), progress=False, stop_at=4))


@pytest.fixture(scope="session")
def family(model_dir):
    from jaxcond.models.unet_clip import UNetCLIP

    return UNetCLIP(model_dir)



@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """64 square and 40 wide demo images with captions, plus two bad files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    combos = demo_data.all_combinations()
    for i in range(104):
        a = combos[i % len(combos)]
        img = demo_data.render(a, rng, 32)
        if i >= 64:  # wide: 32 x 48
            img = np.concatenate([img, np.repeat(img[:, -1:], 16, axis=1)], axis=1)
        Image.fromarray(img).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(demo_data.caption(a))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "broken.txt").write_text("x")
    (root / "nocap.png").write_bytes((root / "000.png").read_bytes())
    return root


def file_config(config: ml_collections.ConfigDict, folder) -> ml_collections.ConfigDict:
    """`config` training from `folder` with two buckets, random crops and flips, and a
    caption rate of 0.3. Crops, flips and the path never enter the compiled step, so every
    run from these files (and from their cache's source) shares one compiled program."""
    cfg = copy.deepcopy(config)
    cfg.data.source, cfg.data.path = "folder", str(folder)
    cfg.data.buckets = ((16, 16), (16, 24))
    cfg.data.crop, cfg.data.flip = "random", True
    cfg.data.eval_prompts = ("a red circle on a blue background",)
    cfg.dropout.groups.caption.rate = 0.3
    return cfg


@pytest.fixture(scope="session")
def stand_ins(config, tmp_path_factory) -> dict[str, str]:
    """Tiny latent models in the SD 1.x/2.x (one encoder, no pooled) and SDXL layouts, as
    diffusers folders with Flax and PyTorch weights (diffusers' PyTorch classes read them)."""
    from jaxcond.models import demo as demo_model
    from jaxcond.models.unet_clip import UNetCLIP

    out = {}
    for name, encoders, pooled in (("sd", 1, False), ("sdxl", 2, True)):
        c = copy.deepcopy(config.model.demo)
        c.vae_channels, c.text_encoders, c.pooled = (32, 32), encoders, pooled
        src = str(tmp_path_factory.mktemp(name + "_flax"))
        demo_model.build(src, c, 16, 0)
        out[name] = str(tmp_path_factory.mktemp(name))
        family = UNetCLIP(src)
        family.save(out[name], family.trainable)
    return out


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator with bucket `gcs.url()`; this process and the ones it starts reach it
    through STORAGE_EMULATOR_HOST, as a user's would."""
    from gcs_emulator import Emulator

    from jaxcond import storage

    emu = Emulator(str(tmp_path_factory.mktemp("gcs")))
    emu.start()
    os.environ[storage.EMULATOR] = emu.host
    for k in ("TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        os.environ.pop(k, None)
    storage.honour_emulator()
    yield emu
    emu.stop()
    os.environ.pop(storage.EMULATOR, None)
