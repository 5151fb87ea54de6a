"""Kills where a run writes outside Orbax: while the demo's base model is built into the run
directory, between that and the first checkpoint (the config copy, compiling), during the
cache build and during export. Each rerun finishes and equals an uninterrupted one."""

import copy
import glob
import json
import os
import random
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from jaxcond import checkpoint, rundir, train as train_lib


def _cmd(command: str, cfg, tmp_path, *args: str) -> list[str]:
    path = tmp_path / f"config_{command}.json"
    path.write_text(json.dumps(checkpoint.config_to_json(cfg)))
    return [sys.executable, "-m", "jaxcond.cli", command, "--config", f"{ROOT}/tests/json_config.py:{path}", *args]


def _kill_once_ready(cmd: list[str], ready, delay: float, timeout: float = 300) -> int:
    """Starts `cmd`, waits until `ready()`, then `delay` seconds, and kills it (SIGKILL);
    returns its exit code: -9, or 0 if it finished during the delay."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{cmd[3]} ended before the moment to kill it:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise TimeoutError(f"{cmd[3]} never reached the moment to kill it")
        time.sleep(0.02)
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    return proc.returncode


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(dirpath, n)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def _lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_kills_in_first_start_cache_build_and_export_leave_everything_resumable(tmp_path):
    cfg = tiny_config()  # model.source = "demo": the base model is built into the run directory
    cfg.train.steps, cfg.checkpoint.every_steps = 4, 2
    reference = str(tmp_path / "reference")
    ref = train_lib.train(copy.deepcopy(cfg), reference, progress=False)
    rng = random.Random(0)
    run = str(tmp_path / "run")
    base = os.path.join(run, "base_model")
    train = _cmd("train", cfg, tmp_path, "--workdir", run)
    codes = [
        # While the base model is being written (it is built aside and renamed when whole).
        _kill_once_ready(train, lambda: bool(glob.glob(base + ".tmp-*")), rng.uniform(0.0, 3.0)),
        # After it, before the first checkpoint: loading, compiling, writing config.json.
        _kill_once_ready(train, lambda: os.path.isdir(base) or bool(glob.glob(base + ".tmp-*")),
                         rng.uniform(0.5, 4.0)),
        # Mid-training.
        _kill_once_ready(train, lambda: os.path.exists(os.path.join(run, "masks.jsonl")), rng.uniform(0.0, 0.5)),
    ]
    assert codes.count(-9) >= 2, codes  # (one may finish its step of the plan first)
    # What a kill inside a log rewrite leaves (the random moments above rarely hit one).
    for stale in ("metrics.jsonl.tmp-4194301", "config.json.tmp-4194302"):
        open(os.path.join(run, stale), "w").write("cut off")
    _run(train)
    assert not glob.glob(os.path.join(run, "*.tmp-*"))
    assert not glob.glob(base + ".tmp-*") and json.load(open(os.path.join(run, "config.json")))["seed"] == cfg.seed
    final = jax.device_get(rundir.load_trained(run).state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ref["state"]), final)
    assert _lines(os.path.join(run, "masks.jsonl")) == _lines(os.path.join(reference, "masks.jsonl"))

    # The cache, killed mid-build, then rebuilt: the same files as one built in one go.
    cached, whole = copy.deepcopy(cfg), copy.deepcopy(cfg)
    cached.data.cache, whole.data.cache = str(tmp_path / "cache"), str(tmp_path / "cache_whole")
    build = _cmd("cache", cached, tmp_path, "--workdir", run)
    _kill_once_ready(build, lambda: os.path.isdir(cached.data.cache), rng.uniform(0.5, 3.0))
    open(os.path.join(cached.data.cache, "manifest.json.tmp-4194303"), "w").write("cut off")  # as a kill mid-write
    _run(build)
    _run(_cmd("cache", whole, tmp_path, "--workdir", run))
    got, want = _files(cached.data.cache), _files(whole.data.cache)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want if k != "manifest.json")
    assert json.loads(got["manifest.json"]) == json.loads(want["manifest.json"])

    # Export, killed while writing, then rerun: the same files as an export in one go.
    out, whole_out = str(tmp_path / "export"), str(tmp_path / "export_whole")
    _run([sys.executable, "-m", "jaxcond.cli", "export", "--run", run, "--out", whole_out])
    export = [sys.executable, "-m", "jaxcond.cli", "export", "--run", run, "--out", out]
    _kill_once_ready(export, lambda: bool(glob.glob(out + ".tmp-*")), rng.uniform(0.0, 1.0))
    if os.path.exists(os.path.join(out, "jaxcond.json")):  # killed after the swap: it is whole
        assert _files(out) == _files(whole_out)
    _run(export)
    assert _files(out) == _files(whole_out) and not glob.glob(out + ".tmp-*")
