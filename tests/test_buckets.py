"""Automatic aspect-ratio buckets (data.buckets = "auto"): the rule, its determinism, a
run trained on them, and bad settings refused."""

import copy
import json
import logging
import random
import types

import numpy as np
import pytest
from PIL import Image

from conftest import build_cache, make_data
from jaxcond import config as config_lib, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.data import buckets, sources


def _auto(area=0, min_side=0, max_side=0, step=0, max_buckets=8):
    return types.SimpleNamespace(area=area, min_side=min_side, max_side=max_side, step=step,
                                 max_buckets=max_buckets)


def _sizes(seed: int, n: int) -> list[tuple[int, int]]:
    """Image sizes of many aspect ratios, more of some than others."""
    rng = np.random.default_rng(seed)
    ratios = np.exp(rng.normal(0, 0.5, n))
    sides = rng.integers(200, 3000, n)
    return [(int(s), max(1, int(s * r))) for s, r in zip(sides, ratios)]


@pytest.mark.parametrize("resolution, auto, multiple", [
    (512, _auto(), 64), (1024, _auto(), 32), (1024, _auto(step=64, max_buckets=3), 32),
    (512, _auto(area=640 * 640, min_side=320, max_side=1280, step=16), 8), (16, _auto(max_buckets=1), 4),
    (768, _auto(max_buckets=20), 8)])
def test_auto_buckets_follow_the_stated_rule(resolution, auto, multiple):
    spec = buckets.resolve(resolution, auto, multiple)
    assert spec.step == (auto.step or multiple) and spec.area == (auto.area or resolution ** 2)
    for sizes in (_sizes(0, 5000), _sizes(1, 50), [(300, 1200)] * 40):
        shapes = buckets.choose(sizes, spec, min_images=16)
        assert 1 <= len(shapes) <= spec.max_buckets and len(set(shapes)) == len(shapes)
        for h, w in shapes:
            assert h % spec.step == 0 and w % spec.step == 0 and (h % multiple, w % multiple) == (0, 0)
            assert (1 - buckets.AREA_TOLERANCE) * spec.area <= h * w <= spec.area
            assert spec.min_side <= min(h, w) and max(h, w) <= spec.max_side
        counts = np.bincount([buckets.nearest(shapes, h, w) for h, w in sizes], minlength=len(shapes))
        assert counts.min() >= 16 or len(shapes) == 1  # every bucket fills a global batch
    assert spec.min_side == (auto.min_side or max(spec.step, -(-(resolution // 2) // spec.step) * spec.step))


def test_auto_buckets_fit_the_data_and_use_the_cap():
    spec = buckets.resolve(512, _auto(max_buckets=3), 64)
    square, wide, tall = [(800, 800)] * 50, [(600, 1000)] * 30, [(1000, 600)] * 20
    assert buckets.choose(square + wide + tall, spec) == ((640, 384), (512, 512), (384, 640))
    assert buckets.choose(square, spec) == ((512, 512),)  # one shape of image: one bucket
    assert len(buckets.choose(_sizes(2, 2000), spec)) == 3
    assert buckets.choose(square + wide, spec, min_images=40) == ((512, 512),)  # 30 wide < 40


def test_same_buckets_from_the_same_sizes_in_any_order():
    spec = buckets.resolve(1024, _auto(), 32)
    sizes = _sizes(3, 3000)
    want = buckets.choose(sizes, spec, min_images=8)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = sizes[:]
        rng.shuffle(shuffled)
        assert buckets.choose(shuffled, spec, min_images=8) == want
    # Each host of a multi-host run scans the whole source: any split of it, read in any
    # order and merged, is the same multiset of sizes.
    for hosts in (2, 3, 8):
        merged = [s for k in range(hosts) for s in sizes[k::hosts]]
        assert buckets.choose(merged, spec, min_images=8) == want


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """32 square, 24 wide (2:3) and 16 tall (3:2) images with captions."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 32)] * 32 + [(32, 48)] * 24 + [(48, 32)] * 16):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    return root


def _auto_config(config, folder, **auto):
    cfg = copy.deepcopy(config)
    cfg.data.source, cfg.data.path, cfg.data.buckets = "folder", str(folder), "auto"
    for k, v in auto.items():
        cfg.data.auto_buckets[k] = v
    return cfg


def test_folder_data_gets_the_same_auto_buckets_whatever_the_listing(config, family, mixed_folder, tmp_path, caplog):
    cfg = _auto_config(config, mixed_folder, step=4)
    config_lib.validate(cfg, None)
    with caplog.at_level(logging.INFO, logger="jaxcond"):
        data = make_data(cfg, family)
    assert data.bucket_shapes == ((20, 12), (16, 16), (12, 20))
    assert np.bincount(data.buckets).tolist() == [16, 32, 24]
    assert "buckets (auto, from the images' aspect ratios" in caplog.text and "12x20: 24, 1" in caplog.text
    # The same images listed in another order (a metadata file, reversed), checked by other
    # numbers of threads: the same buckets.
    names = sorted(p.name for p in mixed_folder.glob("*.png"))[::-1]
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": str(mixed_folder / n), "text": "x"}) + "\n" for n in names))
    other = _auto_config(config, tmp_path / "metadata.jsonl", step=4)
    other.data.source = "metadata"
    for workers in (1, 3):
        again = sources.make_data(other.data, cfg.seed, cfg.train.global_batch, family, workers=workers)
        assert again.bucket_shapes == data.bucket_shapes
        assert sorted(np.bincount(again.buckets).tolist()) == [16, 24, 32]
    # No model loaded (jaxcond masks, shards): the step is the config's, or refused in one line.
    assert sources.make_data(cfg.data, cfg.seed, 16, None).bucket_shapes == data.bucket_shapes
    no_step = _auto_config(config, mixed_folder)
    with pytest.raises(ConfigError, match=r"^config.data.auto_buckets.step = 0 .* set it[^\n]*$"):
        sources.make_data(no_step.data, cfg.seed, 16, None)


def test_a_folder_of_mixed_aspect_ratios_trains_on_auto_buckets_and_resumes(config, mixed_folder, tmp_path):
    cfg = _auto_config(config, mixed_folder)  # step 0: the model's size multiple
    cfg.train.steps, cfg.checkpoint.every_steps = 3, 2
    first = train_lib.train(cfg, str(tmp_path / "run"), progress=False, stop_at=2)
    rest = train_lib.train(cfg, str(tmp_path / "run"), progress=False)  # the same data: the same buckets
    losses = [h["loss"] for h in first["history"] + rest["history"]]
    assert len(losses) == 3 and np.isfinite(losses).all()
    changed = copy.deepcopy(cfg)
    changed.data.auto_buckets.max_buckets = 2
    with pytest.raises(ConfigError, match="config.data.auto_buckets.max_buckets: checkpoint has 8, now 2"):
        train_lib.train(changed, str(tmp_path / "run"), progress=False)


def test_the_cache_keys_on_the_chosen_buckets(config, family, mixed_folder, tmp_path):
    cfg = _auto_config(config, mixed_folder, step=4)
    cfg.data.cache = str(tmp_path / "cache")
    m = build_cache(cfg, family, cfg.data.cache)
    data = make_data(cfg, family, use_cache=False)
    assert [tuple(s) for s in m["bucket_shapes"]] == list(data.bucket_shapes)
    cached = make_data(cfg, family)
    assert cached.bucket_shapes == data.bucket_shapes and cached.fingerprint == data.fingerprint
    other = copy.deepcopy(cfg)
    other.data.auto_buckets.max_buckets = 2
    with pytest.raises(ConfigError, match="auto_buckets"):
        make_data(other, family)


@pytest.mark.parametrize("field, value, message", [
    ("max_buckets", 0, r"config.data.auto_buckets.max_buckets = 0: must be an integer >= 1"),
    ("min_side", 64, r"config.data.auto_buckets.min_side = 64: must be at most config.data.auto_buckets.max_side"),
    ("area", -5, r"config.data.auto_buckets.area = -5: must be a positive area in pixels"),
    ("min_side", 10, r"config.data.auto_buckets.min_side = 10: must be a multiple of the step 4"),
    ("step", 6, r"config.data.auto_buckets.step = 6: must be a multiple of 4"),
    ("area", 20, r"config.data.auto_buckets.area = 20: no bucket of about 20 pixels"),
])
def test_bad_auto_bucket_settings_are_refused_in_one_line(config, field, value, message):
    from configs import demo

    cfg = _auto_config(config, "/nowhere", max_side=32)
    cfg.model = demo.get_config().model  # the demo model: its size multiple (4) is known from the config
    cfg.model.demo.unet_channels, cfg.model.demo.vae_channels = (32, 32, 32), ()
    config_lib.validate(cfg, None, reads_data=False)
    cfg.data.auto_buckets[field] = value
    with pytest.raises(ConfigError, match=f"^{message}[^\n]*$"):
        config_lib.validate(cfg, None, reads_data=False)


def test_buckets_neither_shapes_nor_auto_are_refused(config):
    cfg = _auto_config(config, "/nowhere")
    cfg.data.buckets = "automatic"
    with pytest.raises(ConfigError, match=r'^config.data.buckets = .automatic.: give \(height, width\) .*"auto"'):
        config_lib.validate(cfg, None, reads_data=False)
