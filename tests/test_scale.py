"""Scale-out: FSDP sharding rules, memory per device, resume onto another mesh, and a real
two-process (two-"host") run on this machine compared with a one-process run."""

import copy
import json
import logging
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import start_two_processes
from jaxcond import checkpoint, config as config_lib, distributed, program, sharding, train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("shape, want", [
    ((3, 3, 32, 64), P(None, None, None, "fsdp")),  # largest divisible dimension
    ((64, 32), P("fsdp", None)),
    ((36, 40), P(None, "fsdp")),  # 36 is larger but 8 does not divide it
    ((12, 100), P()),  # nothing divisible by 8: replicated
    ((64,), P()),  # below the minimum size
    ((), P()),
])
def test_param_spec_rule(shape, want):
    assert sharding.param_spec(shape, 8, 1024) == want


def test_param_spec_replicates_everything_without_fsdp():
    assert sharding.param_spec((1024, 1024), 1, 1) == P()


def _shard_bytes(tree) -> tuple[int, int]:
    """(bytes on device 0, total bytes) read off the arrays' actual shards."""
    dev0 = jax.devices()[0]
    on0 = total = 0
    for x in jax.tree.leaves(tree):
        total += x.nbytes
        on0 += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev0)
    return on0, total


def test_fsdp8_params_and_optimizer_state_per_device(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.mesh.data, cfg.mesh.fsdp = 1, 8
    run = train_lib.build(cfg, str(tmp_path))
    state = run.initial_state()
    on0, total = _shard_bytes({"params": state["params"], "opt": state["opt_state"]})
    assert on0 <= 1.2 * total / 8, (on0, total)
    frozen0, frozen_total = _shard_bytes(run.frozen)
    assert frozen0 < frozen_total / 2  # frozen weights follow the same rule
    assert "opt_state" in state and "frozen" not in state  # frozen parts never get optimizer state
    # Without fsdp every device holds everything.
    cfg.mesh.data, cfg.mesh.fsdp = 8, 1
    on0, total = _shard_bytes(train_lib.build(cfg, str(tmp_path)).initial_state()["params"])
    assert on0 == total


def test_summary_reports_mesh_bytes_and_batch(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    run = train_lib.build(cfg, str(tmp_path))
    text = sharding.summary(run.mesh, run.initial_state(), run.frozen, 16, 1)
    assert "mesh {'data': 2, 'fsdp': 4} over 8 device(s)" in text
    assert "optimizer state" in text and "MiB per device" in text
    assert "batch: global 16, per device 2, per process 16" in text


def test_put_batch_assembles_the_global_batch_from_one_load(config, tmp_path):
    run = train_lib.build(config, str(tmp_path))
    calls = []
    ids = np.arange(100, 116)

    def load(rows):
        calls.append(rows)
        return {"x": rows[:, None] * 10}

    out = sharding.put_batch(run.mesh, ids, load)
    assert len(calls) == 1 and sorted(calls[0]) == list(ids)
    np.testing.assert_array_equal(np.asarray(out["x"])[:, 0], ids * 10)
    assert out["x"].sharding == sharding.batch_sharding(run.mesh)


def test_dcn_data_needs_tpu_slices(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.mesh.dcn_data = 2
    with pytest.raises(config_lib.ConfigError, match="config.mesh.dcn_data = 2: these cpu devices are not TPU slices"):
        train_lib.build(cfg, str(tmp_path))
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.dcn_data = 2, 4, 4
    with pytest.raises(config_lib.ConfigError, match="must divide the data axis"):
        train_lib.build(cfg, str(tmp_path))


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resume_onto_a_different_mesh(run_config, reference_run, interrupted_run, tmp_path):
    """Checkpoint on data=8, resume on data=2 x fsdp=4: same masks, same run."""
    ref = reference_run.out  # data=8 throughout
    workdir = interrupted_run.copy_to(tmp_path / "moved")  # data=8, checkpoint at step 4
    moved = copy.deepcopy(run_config)
    moved.mesh.data, moved.mesh.fsdp = 2, 4
    out = train_lib.train(moved, str(workdir), progress=False)
    assert out["state"]["params"]["model"]["unet"]["conv_in"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    assert _jsonl(reference_run.workdir / "masks.jsonl") == _jsonl(workdir / "masks.jsonl")
    for a, b in zip(ref["history"][4:], out["history"]):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4),
                 jax.device_get(ref["state"]["params"]), jax.device_get(out["state"]["params"]))


def test_masks_log_matches_the_masks_command(run_config, reference_run):
    from jaxcond.masks import mask_records

    assert run_config.dropout.groups.caption.rate == 0.4
    assert _jsonl(reference_run.workdir / "masks.jsonl") == list(mask_records(run_config, range(run_config.train.steps)))


def test_distributed_modes_without_a_cluster(monkeypatch):
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize("auto") is False
    assert distributed.initialize("off") is False
    with pytest.raises(ValueError, match="contradicts"):
        distributed.initialize("off", "127.0.0.1:1234", 2, 0)
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        distributed.initialize("auto", "127.0.0.1:1234")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert "SLURM job 7 with 4 tasks" in distributed._announced_processes()


def test_two_processes_equal_one_and_stop_together(run_config, reference_run, tmp_path):
    """Two processes x 4 CPU devices (gloo; mesh data=2 x fsdp=4, data across the
    processes), each started by `jaxcond train`'s command line, vs the one-process x 8
    reference run (data=8): same masks; same losses and params as one process x 8 on the
    same mesh. Only process 1 gets the preemption notice (SIGTERM): both stop after the
    same step with one checkpoint written by both, exit 0, and resuming from it (here in
    one process) continues the one-process run."""
    # The preemption stops the two processes within a step or two of 8.
    cfg = copy.deepcopy(run_config)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    # The processes sum gradients in another order than one process does. With Adam's eps
    # at 1e-8 an element whose gradient is rounding noise moves by up to the learning rate
    # in the noise's direction (1.2e-4 seen here, at 1e-4 bounds); with eps above that
    # noise its update stays as small as the noise, so the params below are compared for
    # what the processes change, not for Adam's amplification of rounding (5e-7 apart here).
    cfg.optim.eps = 1e-6
    assert cfg.checkpoint.every_steps == 4 and cfg.train.steps == 8

    two = tmp_path / "two"
    two.mkdir()
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(checkpoint.config_to_json(cfg)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]  # files: a full pipe would stall them
    procs = []

    def preempt_process_1() -> None:  # once the two-process run has logged its first step
        masks = two / "masks.jsonl"
        while not (masks.exists() and masks.stat().st_size) and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)

    try:
        procs.extend(start_two_processes(cfg_path, two, env, logs))
        preempt = threading.Thread(target=preempt_process_1, daemon=True)
        preempt.start()
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            p.kill()
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    stopped = int(outs[0].split("stopped by SIGTERM at step ")[1].split()[0])
    assert 0 < stopped < cfg.train.steps
    ckpts = checkpoint.Checkpoints(str(two / "checkpoints"), every_steps=1, keep=1, read_only=True)
    assert ckpts.complete_steps()[-1] == stopped

    # One process on the same mesh, to the reference's next checkpoint (steps 4 and 8).
    nxt = -(-(stopped + 1) // cfg.checkpoint.every_steps) * cfg.checkpoint.every_steps
    one_params = train_lib.train(cfg, str(tmp_path / "one"), progress=False, stop_at=nxt)["state"]["params"]
    one_masks = _jsonl(reference_run.workdir / "masks.jsonl")  # masks follow no optimizer setting
    assert _jsonl(tmp_path / "one" / "masks.jsonl") == one_masks[:nxt]
    one_metrics = _jsonl(tmp_path / "one" / "metrics.jsonl")
    assert _jsonl(two / "masks.jsonl") == one_masks[:stopped]
    two_metrics = _jsonl(two / "metrics.jsonl")
    assert [m["step"] for m in two_metrics] == list(range(1, stopped + 1))
    for a, b in zip(one_metrics, two_metrics):
        assert a["drop_frac/caption"] == b["drop_frac/caption"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # Each process loaded exactly its half of every global batch it trained on (and maybe
    # of the next ones, prefetched before the stop), nothing else.
    halves = [json.loads((two / f"loaded_{i}.json").read_text()) for i in range(2)]
    from jaxcond.data import order
    for i, half in enumerate(halves):
        assert set(range(stopped)) <= set(map(int, half))
        for step, ids in half.items():
            want = order.batch_ids(cfg.seed, int(step), cfg.train.global_batch, cfg.data.num_records)
            assert ids == want[8 * i:8 * (i + 1)].tolist(), (i, step)
    # Logs equal to the one-process run (above) mean a single writer: both would duplicate lines.
    assert (two / "tb").is_dir()

    got = train_lib.train(cfg, str(two), progress=False, stop_at=nxt)["state"]["params"]
    assert _jsonl(two / "masks.jsonl") == one_masks[:nxt]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), jax.device_get(one_params),
                 jax.device_get(got))


def test_first_step_logs_its_planned_peak(config, tmp_path, caplog):
    """The start-up reports the compiled step's memory per device (what `jaxcond plan`
    predicts), once; later steps reuse the program compiled for it."""
    run = train_lib.build(copy.deepcopy(config), str(tmp_path))
    state = run.initial_state()
    with caplog.at_level(logging.INFO, logger="jaxcond"):
        for step in range(2):
            state, _ = run.step(state, run.put_batch(step))
    lines = [r.getMessage() for r in caplog.records if "planned peak" in r.getMessage()]
    assert len(lines) == 1 and len(run.compiled) == 1
    peak = program.Memory.of(next(iter(run.compiled.values()))).peak
    assert f"planned peak per device {peak / 2**30:.2f} GiB" in lines[0] and "temporaries" in lines[0]
