"""config.logging.wandb: process 0 logs the TensorBoard scalars, the sample grids and the
config to W&B (offline here), and a resumed run continues the same W&B run."""

import copy
import glob
import json
import os
import struct
import sys
import types

import jax.numpy as jnp
import ml_collections
import pytest

from jaxcond import checkpoint, config as config_lib, distributed, storage, train as train_lib, wandb_log
from jaxcond.checks import ConfigError
from jaxcond.runlog import RunLog
from conftest import tiny_config

wandb = pytest.importorskip("wandb")  # the test extra installs it
from wandb.proto import wandb_internal_pb2  # noqa: E402


def _records(path: str):
    """The records of a .wandb file (W&B's transaction log: a 7-byte header, then LevelDB
    log blocks of 32 KiB whose chunks hold serialized wandb_internal_pb2.Record)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _offline_run(folder: str) -> dict:
    """An offline run folder's id, config and history rows."""
    (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    out = {"id": None, "config": {}, "history": []}
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in r.history.item})
    return out


@pytest.fixture(scope="module")
def offline_runs(run_config, tmp_path_factory):
    """A run with W&B offline, stopped after step 4 and resumed to step 8 (final samples):
    its workdir, its config, the two train() results and its offline run folders, oldest first."""
    tmp = tmp_path_factory.mktemp("wandb")
    cfg = copy.deepcopy(run_config)
    cfg.logging.wandb, cfg.logging.wandb_mode, cfg.logging.wandb_project = True, "offline", "tests"
    workdir = str(tmp / "run")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_DATA_DIR", "data")):
            mp.setenv(var, str(tmp / sub))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        first = train_lib.train(cfg, workdir, progress=False, stop_at=4)
        second = train_lib.train(cfg, workdir, progress=False)
    folders = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    return workdir, cfg, first, second, [_offline_run(f) for f in folders], folders


def test_offline_run_holds_the_scalars_at_the_logged_steps_and_the_config(offline_runs):
    workdir, cfg, first, second, runs, _ = offline_runs
    assert len(runs) == 2
    for run, out in zip(runs, (first, second)):
        rows = {r[wandb_log.STEP]: r for r in run["history"] if "loss" in r}
        assert sorted(rows) == [h["step"] for h in out["history"]]
        for h in out["history"]:  # the same numbers as TensorBoard and metrics.jsonl
            for k in ("loss", "lr", "grad_norm", "drop_frac/caption", "step_time"):
                assert rows[h["step"]][k] == pytest.approx(h[k], rel=1e-6), (h["step"], k)
        want = checkpoint.config_to_json(cfg)
        assert {k: v for k, v in run["config"].items() if k != "_wandb"} == want
    assert [r[wandb_log.STEP] for r in runs[0]["history"] if "loss" in r] == [1, 2, 3, 4]
    assert [r[wandb_log.STEP] for r in runs[1]["history"] if "loss" in r] == [5, 6, 7, 8]


def test_final_sample_grid_is_logged_as_an_image_with_its_layout(offline_runs):
    workdir, cfg, _, second, runs, folders = offline_runs
    (row,) = [r for r in runs[1]["history"] if "samples/_type" in r]
    assert row["samples/_type"] == "image-file" and row[wandb_log.STEP] == cfg.train.steps
    assert "guidance 3" in row["samples/caption"] and "unconditional" in row["samples/caption"]
    assert os.path.isfile(os.path.join(folders[1], "files", row["samples/path"]))
    adherence = {r[wandb_log.STEP]: r for r in runs[1]["history"] if "adherence/cfg3/all" in r}
    assert adherence[cfg.train.steps]["adherence/cfg3/all"] == pytest.approx(second["scores"]["cfg3"]["all"])
    assert not any("samples/_type" in r for r in runs[0]["history"])  # sample_every = 0: only at the end


def test_resumed_run_continues_the_same_wandb_run(offline_runs):
    workdir, _, _, _, runs, _ = offline_runs
    stored = open(os.path.join(workdir, wandb_log.ID_FILE)).read().strip()
    assert stored and [r["id"] for r in runs] == [stored, stored]


class _FakeWandb(types.ModuleType):
    """A recording stand-in for the wandb module: what RunLog asks of W&B, call by call."""

    class Error(Exception):
        pass

    class Image:
        def __init__(self, data, caption=None):
            self.shape, self.caption = data.shape, caption

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        fake = self

        class Run:
            def define_metric(self, *args, **kwargs):
                fake.calls.append(("define_metric", args, kwargs))

            def log(self, data, **kwargs):
                fake.calls.append(("log", data, kwargs))

            def finish(self):
                fake.calls.append(("finish",))

        self.Run = Run

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        if kwargs["mode"] == "offline":  # the folder an offline run writes
            folder = os.path.join(kwargs["dir"], "wandb", f"offline-run-{kwargs['id']}")
            os.makedirs(folder)
            open(os.path.join(folder, f"run-{kwargs['id']}.wandb"), "wb").write(b":W&B")
        return self.Run()


def _runlog(monkeypatch, workdir, main: bool, mode: str = "online"):
    """A RunLog with W&B on, `wandb` a recording fake, as process 0 or as another process."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(distributed, "is_main_process", lambda: main)
    cfg = tiny_config()
    cfg.logging.wandb, cfg.logging.wandb_entity, cfg.logging.wandb_mode = True, "team", mode
    spec = types.SimpleNamespace(global_batch=16, steps_per_epoch=16, groups=())
    data = types.SimpleNamespace(eval_captions=lambda n: ["a red circle", "a blue square"][:n])
    return RunLog(str(workdir), 0, spec, data, cfg), fake, cfg


def test_process_zero_logs_with_a_step_metric_never_a_step(monkeypatch, tmp_path):
    import numpy as np

    log, fake, cfg = _runlog(monkeypatch, tmp_path / "run", main=True)
    log.flush(2, {"loss": jnp.float32(0.5), "dropped/caption": jnp.zeros(16, bool)})
    log.samples(3, True, np.zeros((8, 8, 3), np.uint8), {"cfg3": {"all": 0.25}})
    log.close({})
    (init,), rest = [c for c in fake.calls if c[0] == "init"], [c for c in fake.calls if c[0] != "init"]
    args = init[1]
    assert (args["project"], args["entity"], args["name"], args["resume"]) == ("jaxcond", "team", "run", "allow")
    assert args["dir"] == str(tmp_path / "run") and args["config"] == checkpoint.config_to_json(cfg)
    assert args["id"] == open(tmp_path / "run" / wandb_log.ID_FILE).read().strip()
    assert rest[:2] == [("define_metric", (wandb_log.STEP,), {}),
                        ("define_metric", ("*",), {"step_metric": wandb_log.STEP})]
    logs = [c for c in rest if c[0] == "log"]
    assert all(kwargs == {} for _, _, kwargs in logs)  # no step=: a resume reruns steps W&B has seen
    assert logs[0][1][wandb_log.STEP] == 2 and logs[0][1]["loss"] == 0.5 and "dropped/caption" not in logs[0][1]
    image = logs[1][1]["samples"]
    assert image.shape == (8, 8, 3) and image.caption == (
        "columns: unconditional, guidance 1, guidance 3, guidance 5; rows: a red circle | a blue square")
    assert logs[2][1] == {"adherence/cfg3/all": 0.25, wandb_log.STEP: 3}
    assert rest[-1] == ("finish",)


def test_only_process_zero_logs(monkeypatch, tmp_path):
    import numpy as np

    log, fake, _ = _runlog(monkeypatch, tmp_path, main=False)
    log.flush(1, {"loss": jnp.float32(0.5)})
    log.samples(1, True, np.zeros((8, 8, 3), np.uint8), {})
    log.close({})
    assert fake.calls == [] and not os.listdir(tmp_path)


def test_gcs_run_keeps_wandb_files_local_and_uploads_an_offline_run(gcs, monkeypatch):
    url = gcs.url("wandb", "run")
    ids = []
    for _ in range(2):  # the second start resumes
        log, fake, _ = _runlog(monkeypatch, url, main=True, mode="offline")
        local = fake.calls[0][1]["dir"]
        assert not storage.is_url(local) and not local.startswith(log.mirror.local)  # the mirror appends
        ids.append(fake.calls[0][1]["id"])
        log.close({})
        assert not os.path.exists(local)
    assert ids[0] == ids[1] == storage.read_bytes(storage.join(url, wandb_log.ID_FILE)).decode().strip()
    assert storage.exists(storage.join(url, "wandb", f"offline-run-{ids[0]}", f"run-{ids[0]}.wandb"))


def test_wandb_refusing_to_start_is_a_one_line_error(monkeypatch, tmp_path):
    def refuse(**kwargs):
        raise _FakeWandb.Error("api_key not configured (no-tty).\nCall wandb.login(key=[your_api_key])")

    fake = _FakeWandb()
    monkeypatch.setattr(fake, "init", refuse)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config()
    cfg.logging.wandb = True
    with pytest.raises(ConfigError, match=r"W&B could not start the run \(api_key not configured.*wandb login") as e:
        wandb_log.WandbRun(cfg, str(tmp_path), {})
    assert "\n" not in str(e.value)


def test_wandb_missing_is_a_one_line_error_before_anything_is_built(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = tiny_config()
    cfg.logging.wandb = True
    with pytest.raises(ConfigError, match=r"pip install 'jaxcond\[wandb\]'") as e:
        train_lib.build(cfg, str(tmp_path))
    assert "\n" not in str(e.value) and not os.listdir(tmp_path)
    cfg.logging.wandb = False  # without the flag wandb is never needed
    wandb_log.require(cfg)


@pytest.mark.parametrize("field,value,message", [
    ("wandb", "yes", r"config.logging.wandb = 'yes': must be True or False"),
    ("wandb_mode", "disabled", r"config.logging.wandb_mode = 'disabled': must be one of \('online', 'offline'\)"),
    ("wandb_project", "", r"config.logging.wandb_project = '': must name a W&B project"),
    ("wandb_entity", None, r"config.logging.wandb_entity = None: must be a string"),
])
def test_bad_logging_fields_are_named(field, value, message):
    cfg = tiny_config()
    cfg.logging = ml_collections.ConfigDict({**cfg.logging.to_dict(), field: value})  # past the type lock
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(cfg, None)
