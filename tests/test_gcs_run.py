"""Runs on Cloud Storage, against a real GCS API (the emulator on the loopback address):
the demo trained to a gs:// run directory through SIGKILLs at random moments equals an
uninterrupted local-disk run bitwise, and `jaxcond verify` passes on it; two processes
writing one gs:// run survive the emulator going away (a network fault) with their newest
complete checkpoint intact, and continue exactly once it is back."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from jaxcond import checkpoint, rundir, storage, train as train_lib

KILLS = 6


@pytest.fixture(scope="module")
def demo_config():
    """The tiny demo (its base model built into the run directory), checkpointing
    asynchronously every 2 steps."""
    cfg = tiny_config()
    cfg.train.steps = 16
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.keep = 2
    cfg.checkpoint.async_save = True
    cfg.dropout.groups.caption.rate = 0.4
    return cfg


def _lines(data: bytes) -> list[dict]:
    out = []
    for line in data.decode().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _log(workdir: str, name: str) -> list[dict]:
    path = storage.join(workdir, name)
    return _lines(storage.read_bytes(path)) if storage.exists(path) else []


def _cmd(cfg, workdir: str, tmp_path, *flags: str) -> list[str]:
    path = tmp_path / f"config_{abs(hash(workdir))}.json"
    path.write_text(json.dumps(checkpoint.config_to_json(cfg)))
    return [sys.executable, "-m", "jaxcond.cli", "train", "--config", f"{ROOT}/tests/json_config.py:{path}",
            "--workdir", workdir, *flags]


def test_demo_on_gcs_through_kills_equals_a_local_run(demo_config, gcs, tmp_path):
    """SIGKILL at random moments (start-up and the demo model's upload, steps, asynchronous
    checkpoint writes and log appends); each restart resumes; the finished gs:// run has the
    local run's params, masks and losses bit for bit, and `jaxcond verify` passes on it."""
    local = str(tmp_path / "local")
    ref = train_lib.train(demo_config, local, progress=False)
    url = gcs.url("runs", "kills")
    cmd = _cmd(demo_config, url, tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ckdir = storage.join(url, "checkpoints")
    rng = random.Random(0)
    kills = []
    for i in range(KILLS):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if i % 3 == 0:  # during start-up: imports, the demo model's build and upload, compiling, restoring
            time.sleep(rng.uniform(1.0, 8.0))
        else:  # while training: after a new checkpoint appears, a moment into the next steps
            before = checkpoint.complete_steps(ckdir)
            t0 = time.time()
            while checkpoint.complete_steps(ckdir) == before:
                if proc.poll() is not None:
                    pytest.fail(f"the run ended before kill {i}:\n{proc.stdout.read()[-3000:]}")
                assert time.time() - t0 < 300, "no progress"
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        out, _ = proc.communicate()
        kills.append((i, max(checkpoint.complete_steps(ckdir), default=None), proc.returncode))
        assert proc.returncode in (-signal.SIGKILL, 0), out[-3000:]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    print("kills (index, newest checkpoint after it, exit code):", kills)

    final = jax.device_get(rundir.load_trained(url).state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ref["state"]), final)
    want = _lines(open(os.path.join(local, "masks.jsonl"), "rb").read())
    assert _log(url, "masks.jsonl") == want
    losses = lambda rows: {r["step"]: r["loss"] for r in rows}  # noqa: E731
    assert losses(_log(url, "metrics.jsonl")) == losses(_lines(open(os.path.join(local, "metrics.jsonl"), "rb").read()))
    assert storage.listdir(storage.join(url, "tb")), "TensorBoard events reach the bucket"
    assert checkpoint.partial_checkpoints(ckdir) == []
    r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "verify", "--run", url], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "is consistent" in r.stdout, r.stdout + r.stderr
