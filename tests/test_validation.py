"""Validation split and exact validation losses (`jaxcond.validation`, `jaxcond eval`)."""

import copy
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from jaxcond import config as config_lib, sampling, sharding, train as train_lib, validation
from jaxcond.checks import ConfigError
from jaxcond.data import order, sources, split
from jaxcond.eval_run import eval_run


def test_the_split_is_a_function_of_seed_and_record_id():
    a = split.held_out(3, 1000, 0.2)
    assert a.dtype == bool and 150 < a.sum() < 250
    np.testing.assert_array_equal(split.held_out(3, 400, 0.2), a[:400])  # appending keeps old records' split
    assert not np.array_equal(split.held_out(4, 1000, 0.2), a)
    assert not split.held_out(3, 1000, 0.0).any()


def test_held_out_records_are_never_trained_on():
    cfg = tiny_config()
    cfg.data.validation_fraction = 0.25
    data = sources.make_data(cfg.data, cfg.seed, cfg.train.global_batch, None)
    held = set(np.flatnonzero(data.held_out))
    assert held and data.steps_per_epoch == (data.num_records - len(held)) // cfg.train.global_batch
    seen = np.concatenate([data.ids(s) for s in range(3 * data.steps_per_epoch)])
    assert not held & set(seen.tolist())
    # Without a split the order is exactly the one every run had.
    cfg.data.validation_fraction = 0.0
    plain = sources.make_data(cfg.data, cfg.seed, cfg.train.global_batch, None)
    want = order.bucketed_epoch(cfg.seed, 1, cfg.train.global_batch, plain.buckets)
    np.testing.assert_array_equal(plain.ids(plain.steps_per_epoch), want[0][1])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One run with validation losses every 4 steps, one without: both otherwise equal."""
    base = tmp_path_factory.mktemp("val")
    cfg = tiny_config()
    cfg.data.validation_fraction, cfg.eval.max_examples, cfg.eval.batch = 0.25, 24, 8
    plain = copy.deepcopy(cfg)
    cfg.eval.every = 4
    runs = {}
    for name, c in (("eval", cfg), ("plain", plain)):
        runs[name] = train_lib.train(c, str(base / name), progress=False)
    return base, cfg, runs


def test_evaluating_changes_no_training_stream(evaluated):
    base, _, runs = evaluated
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(runs["eval"]["state"]),
                 jax.device_get(runs["plain"]["state"]))
    masks = [open(base / n / "masks.jsonl").read() for n in ("eval", "plain")]
    assert masks[0] == masks[1]
    assert not [line for line in open(base / "plain" / "metrics.jsonl") if "val/loss" in line]


def test_losses_are_exact_across_evaluations_and_devices(evaluated):
    base, cfg, _ = evaluated
    logged = {r["step"]: r for r in map(json.loads, open(base / "eval" / "metrics.jsonl")) if "val/loss" in r}
    assert sorted(logged) == [4, 8] and logged[8]["val/examples"] == 24
    # The checkpoint of step 8 evaluated again, outside training (one process, every local device).
    again = eval_run(str(base / "eval"), step=8)
    assert again == eval_run(str(base / "eval"), step=8)  # bit-identical
    for k, v in logged[8].items():
        if k != "step":
            np.testing.assert_allclose(again[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert json.load(open(base / "eval" / "eval" / "step8.json")) == again
    # On one device instead of eight: the same numbers to float tolerance.
    from jaxcond import rundir

    t = rundir.load_trained(str(base / "eval"), 8)
    data = sources.make_data(t.cfg.data, t.cfg.seed, t.cfg.train.global_batch, t.family)
    held = sources.validation_set(t.cfg.data, data, t.family)
    one = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    got = validation.evaluate(t.family, t.spec, t.cfg.eval, t.params("ema"), t.family.frozen, *held, one)
    eight = validation.evaluate(t.family, t.spec, t.cfg.eval, t.params("ema"), t.family.frozen, *held,
                                sampling.local_mesh())
    for k in got:
        np.testing.assert_allclose(got[k], eight[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_eval_command_and_its_refusals(evaluated, tmp_path):
    base, cfg, _ = evaluated
    r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "eval", "--run", str(base / "eval"), "--step", "4",
                        "--weights", "raw"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    scores = json.loads(r.stdout.strip().splitlines()[-1])
    assert scores["step"] == 4 and scores["weights"] == "raw" and "val/caption_gap/band3" in scores
    # A run without held-out records: one line naming the flag.
    r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "eval", "--run", str(tmp_path / "nothing")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no checkpoint" in r.stderr
    none = tiny_config()
    assert sources.validation_set(none.data, sources.make_data(none.data, 0, 16, None), None) is None
    bad = tiny_config()
    bad.data.validation_fraction = 1.0
    with pytest.raises(ConfigError, match="validation_fraction"):
        config_lib.validate(bad, None, reads_data=False)
    bad.data.validation_fraction, bad.eval.bands = 0.1, 0
    with pytest.raises(ConfigError, match="eval.bands"):
        config_lib.validate(bad, None, reads_data=False)


def test_a_validation_path_is_read_in_the_training_buckets(image_folder, tmp_path):
    from conftest import file_config

    cfg = file_config(tiny_config(), image_folder)
    cfg.data.validation_path = str(image_folder)  # (the same images here: only the mechanics matter)
    data = sources.make_data(cfg.data, cfg.seed, cfg.train.global_batch, None)
    vdata, ids = sources.validation_set(cfg.data, data, None)
    assert vdata is not data and len(ids) == vdata.num_records == data.num_records
    assert vdata.bucket_shapes == data.bucket_shapes and not data.held_out.any()
    cfg.data.validation_fraction = 0.1
    with pytest.raises(ConfigError, match="set one of them"):
        config_lib.validate(cfg, None)


def test_the_caption_gap_tells_a_captioned_model_from_one_that_never_saw_captions(tmp_path):
    """100 steps of the tiny demo: at caption dropout 0.1 the gap is clearly positive; a model
    trained at rate 1 has a lower one. (Not zero but negative: to it the captions are inputs
    it never trained on, so using them costs; benchmarks/caption_gap.py shows the same on
    the full demo.)"""
    gaps = {}
    for rate in (0.1, 1.0):
        cfg = tiny_config()
        cfg.data.validation_fraction, cfg.eval.every, cfg.eval.max_examples = 0.25, 100, 64
        cfg.train.steps = cfg.train.log_every = cfg.checkpoint.every_steps = 100
        cfg.sample.num_prompts = cfg.sample.per_prompt = 1
        cfg.dropout.groups.caption.rate = rate
        train_lib.train(cfg, str(tmp_path / f"rate{rate}"), progress=False)
        last = [r for r in map(json.loads, open(tmp_path / f"rate{rate}" / "metrics.jsonl")) if "val/loss" in r][-1]
        gaps[rate] = (last["val/caption_gap"], last["val/caption_gap_se"])
    (captioned, se), (never, se_never) = gaps[0.1], gaps[1.0]
    assert captioned > 3 * se, gaps
    assert never < captioned - 3 * max(se, se_never), gaps
