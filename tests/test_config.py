"""Bad configs and flags fail before anything compiles, naming the field and the fix."""

import copy
import json
import os
import subprocess
import sys

import pytest

from jaxcond import config as config_lib, outputs, sharding, train as train_lib
from jaxcond.masks import mask_records
from conftest import ROOT, tiny_config

BAD = [
    ("dropout.groups.caption.rate", 1.5, r"config.dropout.groups.caption.rate = 1.5: must be a number in \[0, 1\]"),
    ("dropout.groups.caption.rate", -0.1, r"config.dropout.groups.caption.rate = -0.1: must be a number in \[0, 1\]"),
    ("dropout.groups.caption.schedule", "cosine", r"config.dropout.groups.caption.schedule = 'cosine': must be one of"),
    ("dropout.groups.caption.members", ("text", "txt"), r"'txt' has no null"),
    ("dropout.nulls.text", "random", r"config.dropout.nulls.text = 'random': must be one of \('empty', 'zeros', 'learned'\)"),
    ("train.global_batch", 12, r"config.train.global_batch = 12: .*8 devices.*multiple of 8"),
    ("train.grad_accum", 3, r"config.train.global_batch = 16: must be divisible by config.train.grad_accum = 3"),
    ("mesh.data", 3, r"config.mesh = \{'data': 3, 'fsdp': 1\}: axis sizes multiply to 3 but 8 devices"),
    ("diffusion.prediction_type", "x0", r"config.diffusion.prediction_type = 'x0'"),
    ("model.demo.unet_channels", (16, 32), r"config.model.demo.unet_channels .* multiple of 32"),
    ("seed", -1, r"config.seed = -1"),
    ("optim.b2", 1.5, r"config.optim.b2 = 1.5: must be in \[0, 1\)"),
    ("optim.eps", 0.0, r"config.optim.eps = 0.0: must be > 0"),
    ("model.demo.attention_heads", 3, r"config.model.demo.attention_heads = 3: must divide the widths of the "
                                      r"cross-attention levels \(32,\)"),
    ("data.resolution", 15, r"config.data.resolution = 15: must be a multiple of 2: this model downsamples"),
    ("data.heldout_fraction", 0.99, r"config.data.heldout_fraction = 0.99: .*too large: could hold out only"),
    ("sample.num_prompts", 0, r"config.sample.num_prompts = 0: must be an integer >= 1"),
    ("sample.per_prompt", 0, r"config.sample.per_prompt = 0: must be an integer >= 1"),
    ("sample.steps", 0, r"config.sample.steps = 0: must be an integer >= 1"),
    ("sample.guidance", (), r"config.sample.guidance = \(\): one or more scales, each >= 0"),
]


def _set(cfg, dotted, value):
    *path, last = dotted.split(".")
    node = cfg
    for p in path:
        node = node[p]
    node[last] = value


@pytest.mark.parametrize("field,value,message", BAD)
def test_bad_config_fails_before_compiling(tmp_path, field, value, message):
    cfg = tiny_config()
    _set(cfg, field, value)
    with pytest.raises(config_lib.ConfigError, match=message):
        train_lib.build(cfg, str(tmp_path))
    assert not os.listdir(tmp_path), "nothing may be built for a config that cannot run"


def test_unknown_conditioner_is_named_with_the_known_ones(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.dropout.groups.caption.members = ("text", "pooled", "text_2")
    cfg.dropout.nulls.text_2 = "zeros"
    with pytest.raises(config_lib.ConfigError,
                       match=r"'text_2'.*unknown conditioner; this model has \('text', 'pooled', 'time_ids'\)"):
        train_lib.build(cfg, str(tmp_path))


def test_conditioner_in_two_groups(tmp_path):
    cfg = tiny_config()
    cfg.dropout.groups.other = copy.deepcopy(cfg.dropout.groups.caption)
    cfg.dropout.groups.other.members = ("pooled",)
    with pytest.raises(config_lib.ConfigError, match="'pooled' is already in group 'caption'"):
        train_lib.build(cfg, str(tmp_path))


def test_mesh_shape_fills_the_free_axis():
    cfg = tiny_config()
    assert sharding.mesh_shape(cfg.mesh, 8) == {"data": 8, "fsdp": 1}
    cfg.mesh.fsdp = 4
    assert sharding.mesh_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 4}


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxcond.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_rejects_a_bad_override_with_the_field_name(tmp_path):
    r = _cli("train", "--config", "configs/demo.py", "--workdir", str(tmp_path),
             "--config.dropout.groups.caption.rate=1.5")
    assert r.returncode != 0
    assert "config.dropout.groups.caption.rate = 1.5: must be a number in [0, 1]" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_unknown_field_missing_file_and_missing_workdir():
    r = _cli("train", "--config", "configs/demo.py", "--config.dropout.groups.captoin.rate=0.2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "jaxcond train: --config.dropout.groups.captoin.rate: no such config field ('captoin'" in r.stderr
    r = _cli("masks", "--config", "configs/demo.py", "--config.seed=1", "--config.train.stepz", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert 'masks: --config.train.stepz: no such config field' in r.stderr  # only the bad one
    assert 'Did you mean "steps" instead of "stepz"?' in r.stderr
    r = _cli("train", "--config", "configs/dmeo.py", "--workdir", "unused")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "jaxcond train: --config configs/dmeo.py: cannot read it" in r.stderr
    r = _cli("train", "--config", "configs/demo.py")
    assert r.returncode != 0 and "train needs --workdir DIR" in r.stderr and "Traceback" not in r.stderr
    r = _cli("bogus")
    assert r.returncode == 2 and "usage: jaxcond COMMAND" in r.stderr


CONFIG_FILES = [  # (the file's text, jaxcond's one line about it)
    ("def get_config(:\n    pass\n", "line 1: invalid syntax: def get_config(:"),
    ("X = 1\n", "defines no get_config(); a config file returns its ml_collections.ConfigDict from get_config() "
                "(see configs/demo.py)"),
    ("def get_config():\n    return {'seed': 0}\n", "get_config() returned a dict, not an ml_collections.ConfigDict"),
    ("def get_config():\n    return undefined\n",
     "line 2 (return undefined): NameError: name 'undefined' is not defined"),
    ("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'seed': 0})\n",
     "the config has no field 'dropout': a config file defines every field of configs/base.py; build on it "
     "with jaxcond.config.from_file('configs/base.py')"),
]


@pytest.mark.parametrize("text,message", CONFIG_FILES)
def test_cli_names_what_is_wrong_in_a_config_file(tmp_path, text, message):
    path = tmp_path / "mine.py"
    path.write_text(text)
    r = _cli("masks", f"--config={path}", "--steps", "0:1")
    assert r.returncode == 1 and r.stdout == "", r.stderr
    where = "" if message.startswith("the config has") else f"--config {path}: "
    assert r.stderr.strip().splitlines() == [f"jaxcond masks: {where}{message}"]


def test_output_folders_are_made_and_proven_writable_up_front(tmp_path, monkeypatch):
    outputs.make_output_dir(str(tmp_path / "new" / "deep"), "--out")
    assert os.listdir(tmp_path / "new" / "deep") == []  # the write probe is gone
    (tmp_path / "f").write_text("x")
    for path, message in ((tmp_path / "f", "is a file, not a folder: choose another path"),
                          (tmp_path / "f" / "sub", r"is not writable \(Not a directory\): choose another path"),
                          ("s3://bucket/x", "only gs:// URLs are supported")):
        with pytest.raises(config_lib.ConfigError, match=f"^--out '?{path}'?:? {message}"):
            outputs.make_output_dir(str(path), "--out")
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists("s3:")  # os.makedirs would have made a local folder of the URL


def test_cli_masks_prints_the_derived_masks():
    r = _cli("masks", "--config", "configs/demo.py", "--steps", "3:6")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    from configs import demo

    want = list(mask_records(demo.get_config(), range(3, 6)))
    assert lines == json.loads(json.dumps(want))
    assert [rec["step"] for rec in lines] == [3, 4, 5]
    g = lines[0]["groups"]["caption"]
    assert len(g["dropped_positions"]) == len(g["dropped_records"]) > 0
    r = _cli("masks", "--config", "configs/demo.py", "--steps", "6:3")
    assert r.returncode != 0 and "expected 0 <= A < B" in r.stderr and not r.stdout
    # The config is validated as for training (but for the devices, which masks do not depend on).
    r = _cli("masks", "--config", "configs/demo.py", "--config.train.global_batch=0", "--config.mesh.data=64")
    assert r.returncode != 0 and "Traceback" not in r.stderr and not r.stdout
    assert "jaxcond masks: config.train.global_batch = 0: must be an integer >= 1" in r.stderr
    # A reader that stops early (`| head -1`) ends the printing quietly.
    p = subprocess.Popen([sys.executable, "-m", "jaxcond.cli", "masks", "--config", "configs/demo.py",
                          "--steps", "0:100000"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(p.stdout.readline())["step"] == 0
    p.stdout.close()
    assert p.wait(timeout=300) == 0 and "Traceback" not in p.stderr.read()


def test_cli_keeps_torch_out_of_the_process():
    """Where torch is installed (the test extra has it) diffusers imports it on every start
    (~5 s, hundreds of MB); the CLI hides it, unless USE_TORCH=1 asks for it."""
    pytest.importorskip("torch")
    code = ("import sys; sys.argv = ['jaxcond', 'masks', '--config', 'configs/demo.py', '--steps', '0:1']\n"
            "from jaxcond import cli\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "import diffusers.utils.distributed_utils as d\nprint('torch is', type(d.torch).__name__)")
    for use_torch, want in (("", "torch is NoneType"), ("1", "torch is module")):
        env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
        env.update({"USE_TORCH": use_torch} if use_torch else {})
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and want in r.stdout, r.stdout + r.stderr


def test_bad_model_folder_is_named(tmp_path):
    r = _cli("train", "--config", "configs/demo.py", "--workdir", str(tmp_path / "run"),
             f"--config.model.source={tmp_path / 'missing'}")
    assert r.returncode != 0 and "not a folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "half").mkdir()
    r = _cli("train", "--config", "configs/demo.py", "--workdir", str(tmp_path / "run"),
             f"--config.model.source={tmp_path / 'half'}")
    assert r.returncode != 0 and "has no unet/ subfolder" in r.stderr and "Traceback" not in r.stderr


def test_masks_take_steps_below_2_31_and_say_the_mesh_is_unused():
    r = _cli("masks", "--config", "configs/demo.py", "--steps", "2147483647:2147483649")
    assert r.returncode != 0 and not r.stdout and "Traceback" not in r.stderr
    assert "expected 0 <= A < B <= 2**31" in r.stderr
    with pytest.raises(config_lib.ConfigError, match=r"step 2147483648: steps are integers in \[0, 2\*\*31\)"):
        list(mask_records(tiny_config(), [2**31]))
    # The last allowed step, on a mesh the machine may not have: masks need one device.
    r = _cli("masks", "--config", "configs/demo.py", "--steps", "2147483646:2147483647", "--config.mesh.data=3")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 2147483646
    assert "config.mesh is not used: the masks do not depend on devices or mesh" in r.stderr


def test_groups_whose_names_share_a_crc32_are_refused_naming_both():
    cfg = tiny_config()
    for name in ("aspjwwk", "rnrsgud"):  # zlib.crc32 of both is 2079472092
        cfg.dropout.groups[name] = copy.deepcopy(cfg.dropout.groups.caption)
        cfg.dropout.groups[name].members = ()
    cfg.dropout.groups.aspjwwk.members = ("text",)
    cfg.dropout.groups.rnrsgud.members = ("pooled",)
    del cfg.dropout.groups["caption"]
    with pytest.raises(config_lib.ConfigError, match="groups 'aspjwwk' and 'rnrsgud' have the same id"):
        config_lib.validate(cfg, None)


def test_runs_saved_before_model_family_resume_unchanged():
    """A checkpoint's config from before `model.family` named the demo by its source and
    carried the demo's fields in every config: neither is a change of the model."""
    from configs import demo, sd15
    from jaxcond.checkpoint import config_to_json

    demo_fields = config_to_json(demo.get_config())["model"]["demo"]
    for module in (demo, sd15):
        now = config_to_json(module.get_config())
        saved = copy.deepcopy(now)
        del saved["model"]["family"]
        saved["model"]["demo"] = demo_fields
        assert config_lib.resume_conflicts(saved, now) == [], module.__name__
        saved["model"]["clip_skip"] = 2
        (conflict,) = config_lib.resume_conflicts(saved, now)
        assert conflict == "config.model.clip_skip: checkpoint has 2, now 1"
