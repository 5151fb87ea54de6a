"""Runs on Cloud Storage, against a real GCS API (the emulator on the loopback address):
the demo trained to a gs:// run directory through SIGKILLs at random moments equals an
uninterrupted local-disk run bitwise, `jaxcond verify` passes on it, and sample and export
read it from the bucket and write into one; two processes
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

from conftest import ROOT, start_two_processes, tiny_config
from jaxcond import checkpoint, export as export_lib, rundir, sample as sample_lib, storage, train as train_lib

KILLS = 5


@pytest.fixture(scope="module")
def demo_config():
    """The tiny demo (its base model built into the run directory), checkpointing
    asynchronously every 2 steps."""
    cfg = tiny_config()
    cfg.train.steps = 12
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
    checkpoint writes and log appends), then a SIGTERM; each restart resumes; the finished gs:// run has the
    local run's params, masks and losses bit for bit, and `jaxcond verify` passes on it."""
    local = str(tmp_path / "local")
    ref = train_lib.train(demo_config, local, progress=False)
    url = gcs.url("runs", "kills")
    cmd = _cmd(demo_config, url, tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ckdir = storage.join(url, "checkpoints")
    rng = random.Random(0)
    kills = []
    for i in range(KILLS + 1):  # the last interruption a preemption notice
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if i % 3 == 0 and i < KILLS:  # during start-up: imports, the demo model's build and upload, compiling, restoring
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
        proc.send_signal(signal.SIGKILL if i < KILLS else signal.SIGTERM)
        out, _ = proc.communicate()
        kills.append((i, max(checkpoint.complete_steps(ckdir), default=None), proc.returncode))
        if i < KILLS:
            assert proc.returncode in (-signal.SIGKILL, 0), out[-3000:]
        else:  # a checkpoint of the step it stopped at, complete in the bucket before the exit
            assert proc.returncode == 0 and "stopped by SIGTERM at step" in out, out[-3000:]
            assert int(out.split("stopped by SIGTERM at step ")[1].split()[0]) == kills[-1][1]
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

    # The other readers of a run take it from the bucket too, and write back into one.
    png = sample_lib.sample(url, ["red circle"], [1.0, 3.0], steps=2)
    assert png == storage.join(url, "samples", "step12-ddim-seed0.png") and storage.read_bytes(png)[:4] == b"\x89PNG"
    manifest = export_lib.export(url, gcs.url("exports", "kills"))
    assert manifest["step"] == 12 and storage.exists(gcs.url("exports", "kills", "unet", "config.json"))


def test_write_access_lost_mid_run_ends_it_in_one_line_and_resumes(demo_config, gcs, tmp_path):
    """The account loses write access (403 on every write): at start that is refused before
    compiling; mid-run the run ends with one line naming the URL and the role it needs, its
    newest complete checkpoint intact; with access back the same command finishes the run
    equal to an uninterrupted local one."""
    cfg = copy.deepcopy(demo_config)
    cfg.checkpoint.async_save = False
    url = gcs.url("runs", "denied")
    cmd = _cmd(cfg, url, tmp_path)
    ckdir = storage.join(url, "checkpoints")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    gcs.deny_writes()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        ours = [line for line in r.stderr.splitlines() if line.startswith("jaxcond train: ")]
        assert len(ours) == 1 and url in ours[0] and "permission denied" in ours[0], r.stderr[-3000:]
        assert "roles/storage.objectAdmin" in ours[0] and "compil" not in r.stderr.lower(), r.stderr[-3000:]
        gcs.deny_writes(False)

        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.time()
        while not checkpoint.complete_steps(ckdir):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - t0 < 300, "no checkpoint"
            time.sleep(0.1)
        gcs.deny_writes()
        out, _ = proc.communicate(timeout=300)
    finally:
        gcs.deny_writes(False)
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    ours = [line for line in out.splitlines() if line.startswith("jaxcond train: ")]
    assert len(ours) == 1 and url in ours[0] and "permission denied" in ours[0], out[-3000:]
    newest = checkpoint.complete_steps(ckdir)[-1]
    assert 0 < newest < cfg.train.steps
    assert int(rundir.load_trained(url, newest).state["step"]) == newest

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "resuming from step" in done.stdout + done.stderr, done.stderr[-3000:]
    assert checkpoint.partial_checkpoints(ckdir) == []
    ref = train_lib.train(cfg, str(tmp_path / "local"), progress=False)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ref["state"]),
                 jax.device_get(rundir.load_trained(url).state))
    assert _log(url, "masks.jsonl") == _lines(open(tmp_path / "local" / "masks.jsonl", "rb").read())
    print(f"write access lost after checkpoint {newest}: {ours[0]}")


def test_two_processes_on_gcs_survive_a_network_fault(run_config, gcs, tmp_path):
    """Two processes (gloo) write one run to gs://. The emulator is stopped mid-run: the
    run ends with a one-line message naming the bucket, within the configured retries, and
    the newest complete checkpoint restores. With the emulator back, the same command
    resumes and finishes: every step's masks logged once and equal to the re-derived ones,
    losses those of an uninterrupted run on the same mesh, `verify` clean."""
    from jaxcond import masks as masks_lib, verify as verify_lib

    cfg = copy.deepcopy(run_config)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.optim.eps = 1e-6  # see test_scale.py: compare what the processes change, not Adam's rounding noise
    cfg.train.steps = 12
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.storage_retries = 2
    url = gcs.url("runs", "two")
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(checkpoint.config_to_json(cfg)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           # A failed background save leaves the other process waiting for Orbax's signals
           # until its coordination timeout (300 s): shortened here, the same path taken sooner.
           "ORBAX_COORDINATION_TIMEOUT": "20"}
    ckdir = storage.join(url, "checkpoints")

    def two_processes(logs: str, fault: bool) -> list[str]:
        files = [tmp_path / f"{logs}_{i}.log" for i in range(2)]
        procs = []
        try:
            procs.extend(start_two_processes(cfg_path, url, env, files, record_dir=tmp_path))
            if fault:
                t0 = time.time()
                while not checkpoint.complete_steps(ckdir):
                    assert all(p.poll() is None for p in procs), files[0].read_text()[-3000:]
                    assert time.time() - t0 < 300, "no checkpoint"
                    time.sleep(0.1)
                gcs.stop()
            for p in procs:
                p.wait(timeout=400)
        finally:
            for p in procs:
                p.kill()
        return [f.read_text() for f in files]

    t0 = time.time()
    try:
        out = two_processes("fault", fault=True)
        failed_after = time.time() - t0
    finally:
        gcs.start()
    ours = [line for line in out[0].splitlines() if line.startswith("jaxcond train: ")]
    assert len(ours) == 1 and url in ours[0], out[0][-4000:]
    newest = checkpoint.complete_steps(ckdir)[-1]
    assert 0 < newest < cfg.train.steps
    restored = rundir.load_trained(url, newest)
    assert int(restored.state["step"]) == newest

    out = two_processes("resume", fault=False)
    assert "resuming from step" in out[0], out[0][-3000:]
    want = list(masks_lib.mask_records(cfg, range(cfg.train.steps)))
    assert _log(url, "masks.jsonl") == want
    two = _log(url, "metrics.jsonl")
    assert [m["step"] for m in two] == list(range(1, cfg.train.steps + 1))
    one = train_lib.train(cfg, str(tmp_path / "one"), progress=False)["history"]
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5)
    assert verify_lib.verify(url, report=lambda line: None) == []
    print(f"the fault ended the run in {failed_after:.0f} s (both processes); newest checkpoint {newest}: {ours[0]}")
