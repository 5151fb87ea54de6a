"""Fault tolerance: kills at random moments, preemption signals, non-finite
numbers, unwritable or full disks, changed code on resume, and `jaxcond verify`.

Every interrupted run is compared with one uninterrupted reference run of the same
config (same topology: 8 simulated CPU devices), bitwise. A preemption notice reaching one
host of two is tested with the two-process run in test_scale.py."""

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcond import checkpoint, config as config_lib, rundir, train as train_lib, verify as verify_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 10  # at least 10; plus a SIGTERM and a Ctrl-C, each a process start


@pytest.fixture(scope="module")
def fault_config(config):
    """The tiny run, long enough to be interrupted, checkpointing asynchronously every 2 steps."""
    cfg = copy.deepcopy(config)
    cfg.train.steps = 24
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.keep = 2
    cfg.checkpoint.async_save = True
    return cfg


@pytest.fixture(scope="module")
def reference(fault_config, tmp_path_factory):
    """The uninterrupted run, with every checkpoint (each second step) kept."""
    cfg = copy.deepcopy(fault_config)
    cfg.checkpoint.keep = 1000
    workdir = str(tmp_path_factory.mktemp("reference"))
    train_lib.train(cfg, workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def target(reference):
    """The abstract state (shapes, dtypes, one device) of every run here: restoring onto it
    needs no model load, unlike `load_trained` (seconds per checkpoint)."""
    state = rundir.load_trained(reference).state
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def _states(workdir: str, target, seen: set | None = None) -> dict:
    """{step: restored state} of the complete checkpoints of `workdir`, skipping those
    already in `seen` (by step and folder inode: a rewritten folder is read again)."""
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every_steps=1, keep=1, read_only=True)
    out = {}
    for step in ckpts.complete_steps():
        key = (step, os.stat(os.path.join(ckpts.directory, str(step))).st_ino)
        if seen is None or key not in seen:
            out[step] = jax.device_get(ckpts.restore(step, target))
            if seen is not None:
                seen.add(key)
    ckpts.close()
    return out


def _lines(workdir: str, name: str) -> list[dict]:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line torn by the kill; the next start drops it
    return out


def _assert_matches_reference(workdir: str, reference: str, ref_states: dict, target, seen: set) -> None:
    """Every complete checkpoint of `workdir` not checked before that the reference also has
    (the even steps; a signal can stop at an odd one) and every logged mask equals the
    reference's."""
    for step, state in _states(workdir, target, seen).items():
        if step in ref_states:
            jax.tree.map(np.testing.assert_array_equal, ref_states[step], state)
    want = {r["step"]: r for r in _lines(reference, "masks.jsonl")}
    for rec in _lines(workdir, "masks.jsonl"):
        assert rec == want[rec["step"]], rec["step"]


def _train_cmd(cfg, workdir: str, tmp_path) -> list[str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(checkpoint.config_to_json(cfg)))
    return [sys.executable, "-m", "jaxcond.cli", "train", "--config",
            f"{ROOT}/tests/json_config.py:{path}", "--workdir", workdir]


def _wait_for_progress(workdir: str, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Waits until the run logs a step beyond those already logged; False if it ended first."""
    path = os.path.join(workdir, "masks.jsonl")
    before = len(_lines(workdir, "masks.jsonl"))
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if os.path.exists(path) and len(_lines(workdir, "masks.jsonl")) > before:
            return True
        time.sleep(0.05)
    raise TimeoutError("the run made no progress")


def test_random_kills_and_signals_resume_to_the_uninterrupted_run(fault_config, reference, target, tmp_path):
    """SIGKILL at random moments (during start-up, steps and asynchronous checkpoint
    writes), plus a SIGTERM and a Ctrl-C: each resume starts from a checkpoint equal to the
    reference's, and the finished run equals the reference bitwise."""
    ref_states = _states(reference, target)
    seen: set = set()
    workdir = str(tmp_path / "run")
    cmd = _train_cmd(fault_config, workdir, tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    plan = ["SIGKILL"] * KILLS + ["SIGTERM", "SIGINT"]
    random.Random(0).shuffle(plan)
    rng = random.Random(1)
    partial_seen = 0
    for i, sig in enumerate(plan):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        # Every third kill lands in start-up (import, compile, restore); the rest while training.
        if sig == "SIGKILL" and i % 3 == 0:
            time.sleep(rng.uniform(0.5, 6.0))
        elif not _wait_for_progress(workdir, proc):
            pytest.fail(f"the run finished before interruption {i}:\n{proc.stdout.read()}")
        else:
            time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(getattr(signal, sig))
        out, _ = proc.communicate(timeout=300)
        if sig == "SIGKILL":
            assert proc.returncode == -signal.SIGKILL, out
        else:
            assert proc.returncode == 0, out
            assert f"stopped by {sig} at step" in out, out
            stopped = int(out.split(f"stopped by {sig} at step ")[1].split()[0])
            assert stopped in checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every_steps=1,
                                                     keep=1, read_only=True).complete_steps()
        partial_seen += bool(checkpoint.partial_checkpoints(os.path.join(workdir, "checkpoints")))
        _assert_matches_reference(workdir, reference, ref_states, target, seen)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert checkpoint.partial_checkpoints(os.path.join(workdir, "checkpoints")) == []
    final = jax.device_get(rundir.load_trained(workdir).state)
    jax.tree.map(np.testing.assert_array_equal, ref_states[fault_config.train.steps], final)
    assert _lines(workdir, "masks.jsonl") == _lines(reference, "masks.jsonl")
    losses = lambda d: {r["step"]: r["loss"] for r in _lines(d, "metrics.jsonl")}  # noqa: E731
    assert losses(workdir) == losses(reference)
    print(f"interruptions: {plan}; partial checkpoints found after {partial_seen} of them")
    # `jaxcond verify` agrees, and notices a tampered mask record.
    r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "verify", "--run", workdir], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "is consistent" in r.stdout, r.stdout + r.stderr
    records = _lines(workdir, "masks.jsonl")
    records[3]["groups"]["caption"]["dropped_positions"].append(15)
    with open(os.path.join(workdir, "masks.jsonl"), "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
    problems = verify_lib.verify(workdir, report=lambda line: None)
    assert len(problems) == 1 and "masks of steps 3 differ" in problems[0], problems


def test_partial_checkpoint_is_reported_and_ignored(fault_config, reference, tmp_path, caplog):
    """A checkpoint folder left half-written (as by a kill mid-save) is never resumed from."""
    workdir = str(tmp_path / "run")
    train_lib.train(fault_config, workdir, progress=False, stop_at=4)
    ckdir = os.path.join(workdir, "checkpoints")
    partial = os.path.join(ckdir, "6.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "garbage"), "w") as f:
        f.write("half a write")
    out = train_lib.train(fault_config, workdir, progress=False, stop_at=6)
    assert [h["step"] for h in out["history"]] == [5, 6]
    assert "ignoring 1 partial checkpoint" in caplog.text and "6.orbax-checkpoint-tmp-1234" in caplog.text
    assert not os.path.exists(partial)
    ref = rundir.load_trained(reference, 6).state
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ref), jax.device_get(out["state"]))


def test_non_finite_updates_are_skipped_then_the_run_stops(fault_config, tmp_path):
    """A learning rate of 1e30 makes every update after the first non-finite: they are
    skipped (params, optimizer state and EMA stay those of step 1), counted, and past the
    limit the run checkpoints the last good state and stops with a message."""
    cfg = copy.deepcopy(fault_config)
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_skipped_updates = 1e30, 0, 2
    good = train_lib.train(cfg, str(tmp_path / "good"), progress=False, stop_at=1)["state"]
    with pytest.raises(train_lib.NonFiniteError, match=r"3 updates had a non-finite.*step 4"):
        train_lib.train(cfg, str(tmp_path / "bad"), progress=False)
    saved = rundir.load_trained(str(tmp_path / "bad"))
    assert saved.step == 4 and int(saved.state["skipped"]) == 3
    for key in ("params", "opt_state", "ema"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(good[key]), jax.device_get(saved.state[key]))
    # Skipped steps still consumed their masks: the log has every step, as the config derives them.
    assert [r["step"] for r in _lines(str(tmp_path / "bad"), "masks.jsonl")] == [0, 1, 2, 3]
    assert verify_lib.verify(str(tmp_path / "bad"), report=lambda line: None) == []


def test_unwritable_or_full_run_directory_fails_before_training(fault_config, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(config_lib.ConfigError, match=f"--workdir '{blocker / 'run'}' is not writable "
                                                     r"\(Not a directory\): choose another path"):
        train_lib.train(fault_config, str(blocker / "run"), progress=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="--workdir 's3://bucket/run': only gs:// URLs are supported"):
        train_lib.train(fault_config, "s3://bucket/run", progress=False)
    assert not (tmp_path / "s3:").exists()
    monkeypatch.setattr(train_lib.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(checkpoint.CheckpointError, match="has 0 MiB free but one checkpoint"):
        train_lib.train(fault_config, str(tmp_path / "run"), progress=False)


def test_disk_full_mid_run_keeps_the_previous_checkpoint(fault_config, reference, tmp_path):
    """A checkpoint write failing with a real OS error (files capped at 64 KiB by
    RLIMIT_FSIZE, as a full disk would fail them) ends the run with a message naming the
    intact checkpoint; with space back, the run resumes from it exactly."""
    workdir = str(tmp_path / "run")
    cfg = copy.deepcopy(fault_config)
    cfg.checkpoint.async_save = False
    # The run so far: the reference's checkpoint of step 2 (how checkpoints are saved is
    # not a resume-critical setting), as if this run had written it.
    shutil.copytree(os.path.join(reference, "checkpoints", "2"), os.path.join(workdir, "checkpoints", "2"))
    capped = [sys.executable, "-c",
              "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY)); "
              "sys.argv[0] = 'jaxcond'; from jaxcond.cli import main; main()",
              *_train_cmd(cfg, workdir, tmp_path)[3:]]
    r = subprocess.run(capped, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    # Orbax logs the failed write from its own threads; jaxcond's message is one line of its
    # own, not buried in tensorstore's echoes of the same error (Checkpoints drops those).
    ours = [line for line in r.stderr.splitlines() if line.startswith("jaxcond train: writing a checkpoint into")]
    assert len(ours) == 1 and r.stderr.count("jaxcond train: writing") == 1, r.stderr
    assert "Event loop is closed" not in r.stderr, r.stderr
    assert "File too large" in ours[0] and "step 2, is intact" in ours[0], ours[0]
    out = train_lib.train(cfg, workdir, progress=False, stop_at=4)
    assert out["history"][0]["step"] == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(rundir.load_trained(reference, 4).state),
                 jax.device_get(out["state"]))


def test_an_error_after_the_last_save_keeps_that_checkpoint(fault_config, reference, tmp_path):
    """The final evaluation fails while the last (asynchronous) save is still being written:
    the process lets the write finish before it exits with the error, where exiting at once
    left only `4.orbax-checkpoint-tmp` (and orbax's "cannot schedule new futures" errors)."""
    workdir = str(tmp_path / "run")
    cfg = copy.deepcopy(fault_config)
    cfg.train.steps = 4
    shutil.copytree(os.path.join(reference, "checkpoints", "2"), os.path.join(workdir, "checkpoints", "2"))
    failing = [sys.executable, "-c",
               "import sys; sys.argv[0] = 'jaxcond'\n"
               "from jaxcond import train\n"
               "def evaluate(run, state):\n"
               "    raise RuntimeError('evaluation failed')\n"
               "train.evaluate = evaluate\n"
               "from jaxcond.cli import main; main()",
               *_train_cmd(cfg, workdir, tmp_path)[3:]]
    r = subprocess.run(failing, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "RuntimeError: evaluation failed" in r.stderr, r.stdout + r.stderr
    assert "cannot schedule new futures" not in r.stderr, r.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert int(rundir.load_trained(workdir, 4).state["step"]) == 4  # complete: it restores


def test_restore_names_arrays_whose_shape_changed(tmp_path):
    ckpts = checkpoint.Checkpoints(str(tmp_path), every_steps=1, keep=1, async_save=False)
    state = {"step": jnp.int32(1), "params": {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}}
    ckpts.save(1, state, config_lib.ml_collections.ConfigDict({"seed": 0}), {"next_step": 1})
    ckpts.wait()
    target = {"step": jnp.int32(0), "params": {"w": jnp.ones((3, 5)), "c": jnp.zeros(4)}}
    with pytest.raises(checkpoint.CheckpointError) as e:
        ckpts.restore(1, target)
    msg = str(e.value)
    assert "params/w: checkpoint has (3, 4) float32, the run now (3, 5) float32" in msg
    assert "params/b: in the checkpoint, not in the run now" in msg
    assert "params/c: in the run now, not in the checkpoint" in msg
    ckpts.close()


def test_safe_config_changes_resume_and_unsafe_ones_are_listed(fault_config):
    saved = checkpoint.config_to_json(fault_config)
    safe = copy.deepcopy(fault_config)
    safe.train.steps, safe.train.log_every, safe.checkpoint.keep, safe.train.sample_every = 99, 7, 5, 3
    assert config_lib.resume_conflicts(saved, checkpoint.config_to_json(safe)) == []
    unsafe = copy.deepcopy(fault_config)
    unsafe.train.global_batch = 32
    unsafe.model.demo.text_width = 32
    unsafe.data.num_records = 512
    got = "\n".join(config_lib.resume_conflicts(saved, checkpoint.config_to_json(unsafe)))
    for field in ("config.train.global_batch", "config.model", "config.data"):
        assert field in got
