"""The cache (`jaxcond cache`): same records, same batches, same masks and nulls as without
it, and refusals when it no longer describes the data or the model."""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_cache, file_config, make_data, write_shards
from jaxcond import config as config_lib, dropout, train as train_lib, train_step as ts
from jaxcond.data import cache


def _cached_config(config, folder, directory):
    cfg = file_config(config, folder)
    cfg.data.crop, cfg.data.flip = "center", False  # what a cache can hold
    cfg.data.cache = str(directory)
    return cfg


@pytest.fixture(scope="module")
def built(config, family, image_folder, tmp_path_factory):
    cfg = _cached_config(config, image_folder, tmp_path_factory.mktemp("cache"))
    build_cache(cfg, family, cfg.data.cache)
    return cfg


def test_cache_gives_the_same_batches_as_the_files(built, family):
    files_data = make_data(built, family, use_cache=False)
    cached = make_data(built, family)
    assert isinstance(cached, cache.CachedData)
    assert cached.buckets == files_data.buckets and cached.steps_per_epoch == files_data.steps_per_epoch
    for step in (0, 3, cached.steps_per_epoch + 1):
        ids = cached.ids(step)
        np.testing.assert_array_equal(ids, files_data.ids(step))
        want, got = files_data.batch(ids, step), cached.batch(ids, step)
        np.testing.assert_array_equal(got["images"], want["images"])
        enc = family.encode(family.frozen, jnp.asarray(want["tokens"]))
        for k, v in enc.items():
            np.testing.assert_allclose(got[f"cond/{k}"], v, atol=1e-6)


def test_dropout_masks_and_nulls_identical_with_and_without_cache(built, family, tmp_path):
    """The step drops and substitutes nulls on cached encodings exactly as on tokens.

    The steps are the runs' own compiled programs (`train.build`), those that training from
    the files and from the cache (the next test) runs."""
    seen = {}
    for name, use_cache in (("files", False), ("cache", True)):
        cfg = copy.deepcopy(built)
        cfg.data.cache = built.data.cache if use_cache else ""
        run = train_lib.build(cfg, str(tmp_path / name))
        spec = run.spec
        state = run.initial_state()
        state["params"]["nulls"]["text"] += 1.0  # a null unlike any real encoding
        state["step"] = jnp.int32(2)
        state = jax.device_put(state, run.state_shardings)
        batch = jax.tree.map(jnp.asarray, run.data.batch(run.data.ids(2), 2))
        x0 = family.images_to_x0(family.frozen, batch["images"])
        r = ts.step_randomness(spec, state["step"], x0.shape)
        cond = (family.encode(family.frozen, batch["tokens"]) if "tokens" in batch
                else {k[5:]: v for k, v in batch.items() if k.startswith("cond/")})
        empty = family.encode(family.frozen, jnp.asarray(ts.empty_tokens(family)))
        nulls = dropout.null_values(dict(spec.nulls), empty, state["params"]["nulls"])
        seen[name] = (np.asarray(r["masks"]["caption"]),
                      jax.device_get(dropout.apply(cond, nulls, r["masks"], spec.groups)))
        _, m = run.step_fn(state, run.frozen, run.put_batch(2))
        seen[name] += (float(m["loss"]), float(m["drop_frac/caption"]))
    (mask_f, cond_f, loss_f, frac_f), (mask_c, cond_c, loss_c, frac_c) = seen["files"], seen["cache"]
    np.testing.assert_array_equal(mask_f, mask_c)
    assert 0 < mask_f.sum() < len(mask_f) and frac_f == frac_c
    for k in cond_f:
        np.testing.assert_array_equal(cond_f[k][mask_f], cond_c[k][mask_c])  # the nulls, exactly
        np.testing.assert_allclose(cond_f[k][~mask_f], cond_c[k][~mask_c], atol=1e-6)
    np.testing.assert_allclose(loss_f, loss_c, rtol=1e-5)


def test_training_from_the_cache_matches_training_from_files(built, tmp_path):
    plain = copy.deepcopy(built)
    plain.data.cache = ""
    ref = train_lib.train(plain, str(tmp_path / "files"), progress=False, stop_at=4)
    out = train_lib.train(built, str(tmp_path / "cache"), progress=False, stop_at=4)
    for a, b in zip(ref["history"], out["history"]):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    masks = [open(tmp_path / d / "masks.jsonl").read() for d in ("files", "cache")]
    assert masks[0] == masks[1]
    # Switching a run to its cache is not a config change that breaks the run.
    assert train_lib.train(built, str(tmp_path / "files"), progress=False, stop_at=5)["history"]


def test_cache_refuses_what_it_cannot_hold_or_no_longer_describes(built, family, image_folder, tmp_path):
    random_crop = copy.deepcopy(built)
    random_crop.data.crop = "random"
    with pytest.raises(config_lib.ConfigError, match="random"):
        build_cache(random_crop, family, str(tmp_path / "c1"))
    other_size = copy.deepcopy(built)
    other_size.data.buckets = ((24, 24),)
    with pytest.raises(config_lib.ConfigError, match="buckets"):
        make_data(other_size, family)
    with pytest.raises(config_lib.ConfigError, match="another model or dataset"):
        build_cache(other_size, family, built.data.cache)
    missing = copy.deepcopy(built)
    missing.data.cache = str(tmp_path / "none")
    with pytest.raises(config_lib.ConfigError, match="jaxcond cache"):
        make_data(missing, family)


def test_cache_is_keyed_by_every_encoding_setting(built, model_dir, family):
    """A cache built at clip_skip 1 holds last-layer encodings; a run at clip_skip 2 (or in
    another dtype) would mix them with nulls from its own setting."""
    import jax.numpy as jnp
    from jaxcond.models.unet_clip import UNetCLIP

    for other, what in ((UNetCLIP(model_dir, clip_skip=2), r"model setting clip_skip \(cache 1, now 2\)"),
                        (UNetCLIP(model_dir, dtype=jnp.bfloat16), r"model setting dtype \(cache 'float32', "
                                                                   r"now 'bfloat16'\)")):
        with pytest.raises(config_lib.ConfigError, match=f"cannot train from the cache .*built with {what}"):
            make_data(built, other)
        with pytest.raises(config_lib.ConfigError, match=f"another model or dataset \\({what}\\)"):
            build_cache(built, other, built.data.cache)
    make_data(built, family)  # the setting it was built with


def test_interrupted_cache_resumes_and_changed_files_are_noticed(config, family, image_folder, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(cache, "CHUNK", 32)
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    cfg = _cached_config(config, folder, tmp_path / "cache")
    build_cache(cfg, family, cfg.data.cache)
    manifest_path = os.path.join(cfg.data.cache, "manifest.json")
    manifest = json.load(open(manifest_path))
    assert manifest["done"] == [0, 1, 2, 3]
    manifest["done"] = [0, 1]  # as if killed during chunk 2
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(config_lib.ConfigError, match="incomplete"):
        make_data(cfg, family)
    assert build_cache(cfg, family, cfg.data.cache)["done"] == [0, 1, 2, 3]
    make_data(cfg, family)
    (folder / "005.png").write_bytes((folder / "006.png").read_bytes())
    with pytest.raises(config_lib.ConfigError, match="changed on disk"):
        make_data(cfg, family)


def test_demo_cache_keeps_the_adherence_scores(config, family, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.data.cache = str(tmp_path / "cache")
    build_cache(cfg, family, cfg.data.cache)
    run = train_lib.build(cfg, str(tmp_path / "run"))
    assert isinstance(run.data, cache.CachedData)
    _, scores, _ = train_lib.evaluate(run, run.initial_state())
    assert set(scores) == {"uncond", "cfg1", "cfg3", "cfg5", "chance"}


def test_cli_cache_builds_and_explains_bad_settings(built, model_dir, image_folder, tmp_path):
    from test_config import _cli

    common = ["--config", "configs/demo.py", f"--config.model.source={model_dir}",
              "--config.data.source=folder", f"--config.data.path={image_folder}"]
    r = _cli("cache", *common, f"--config.data.cache={tmp_path / 'c'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cache of 104 records" in r.stdout and (tmp_path / "c" / "manifest.json").exists()
    r = _cli("cache", *common, f"--config.data.cache={tmp_path / 'd'}", "--config.data.flip=True")
    assert r.returncode != 0 and "config.data.cache: data.flip" in r.stderr and "Traceback" not in r.stderr
    r = _cli("cache", *common)
    assert r.returncode != 0 and "--config.data.cache=DIR" in r.stderr


@pytest.mark.parametrize("source", ["shards", "hf"])
def test_cache_of_an_immutable_source_notices_a_rewrite(config, family, image_folder, tmp_path, source):
    import datasets


    cfg = _cached_config(config, image_folder, tmp_path / "cache")
    cfg.data.cache = ""
    records = make_data(cfg, family).records

    def write(n):  # the source with its first n records
        if source == "shards":
            sub = copy.deepcopy(cfg)
            sub.data.source, sub.data.path = "folder", str(tmp_path / f"imgs{n}")
            os.makedirs(sub.data.path, exist_ok=True)
            for r in records[:n]:
                shutil.copy(r.path, sub.data.path)
                shutil.copy(r.path[:-4] + ".txt", sub.data.path)
            write_shards(sub, str(tmp_path / "src"), num_shards=2)
        else:
            datasets.Dataset.from_dict(
                {"image": [{"bytes": open(r.path, "rb").read(), "path": None} for r in records[:n]],
                 "text": [r.caption for r in records[:n]]},
                features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
            ).save_to_disk(str(tmp_path / "src"))

    write(64)
    cfg.data.source, cfg.data.path, cfg.data.cache = source, str(tmp_path / "src"), str(tmp_path / "cache")
    build_cache(cfg, family, cfg.data.cache)
    assert make_data(cfg, family).num_records == 64
    shutil.rmtree(tmp_path / "src")
    write(48)
    with pytest.raises(config_lib.ConfigError, match="changed on disk"):
        make_data(cfg, family)


def test_cache_holds_the_null_encodings(built, family):
    """nulls.npz is the empty caption's encoding, the `empty` null the step computes."""
    stored = np.load(os.path.join(built.data.cache, cache.NULLS))
    empty = family.encode(family.frozen, jnp.asarray(ts.empty_tokens(family)))
    assert set(stored.files) == set(empty)
    for k, v in empty.items():
        np.testing.assert_allclose(stored[k], v, atol=1e-6)
