"""The package's shape: no import cycles, small modules, and model families that plug in
by name without touching any other file."""

import ast
import copy
import json
import os
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, tiny_config
from jaxcond import export as export_lib, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.models import registry

PACKAGE = ROOT / "jaxcond"
MAX_LINES = 400


def _modules() -> dict[str, str]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = str(path)
    return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The jaxcond modules `path` imports anywhere, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return found - {"jaxcond"}


def test_no_import_cycle_counting_function_level_imports():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"
    assert "jaxcond.checks" in graph and not graph["jaxcond.checks"]  # the leaf everything may use


def test_no_module_over_400_lines():
    sizes = {m: sum(1 for _ in open(p)) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_no_file_outside_models_names_a_concrete_family():
    for name in ("train.py", "export.py", "config.py", "cli.py", "rundir.py", "sample.py"):
        text = (PACKAGE / name).read_text()
        for family in ("UNetCLIP", "unet_clip", "models.demo", "models import demo"):
            assert family not in text, f"jaxcond/{name} names {family}"


# A family in a module of its own, outside jaxcond: pixel space, a bag-of-characters text
# encoder and a per-pixel linear denoiser. Nothing else in the repository knows it.
THROWAWAY = '''
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxcond.checks import int_at_least
from jaxcond.models.family import Family


class Throwaway(Family):
    max_length = 8

    def __init__(self, size, width):
        self.width = width
        self.conditioners = {"text": (self.max_length, width)}
        self.sample_shape = (3, size, size)
        self.frozen = {"embed": jax.random.normal(jax.random.key(0), (128, width)) * 0.1}
        self.trainable = {"denoiser": {"w": jnp.zeros((4 + width, 3)), "b": jnp.zeros((3,))}}

    @classmethod
    def check_config(cls, model):
        int_at_least("model.width", model.width, 1)

    @classmethod
    def from_config(cls, model, *, workdir, dtype, resolution):
        return cls(resolution, model.width)

    def tokenize(self, captions):
        ids = np.zeros((len(captions), self.max_length), np.int32)
        for i, c in enumerate(captions):
            codes = [ord(ch) % 128 for ch in c[:self.max_length]]
            ids[i, :len(codes)] = codes
        return ids

    def overlong(self, captions):
        return np.array([len(c) > self.max_length for c in captions], bool)

    def encode(self, params, tokens):
        return {"text": params["embed"][tokens]}

    def denoise(self, trainable, x_t, t, cond):
        b, _, h, w = x_t.shape
        context = jnp.broadcast_to(cond["text"].mean(1)[:, :, None, None], (b, self.width, h, w))
        time = jnp.broadcast_to((t / 1000.0)[:, None, None, None], (b, 1, h, w))
        features = jnp.concatenate([x_t, context, time], axis=1)
        p = trainable["denoiser"]
        return jnp.einsum("bchw,cd->bdhw", features, p["w"]) + p["b"][None, :, None, None]

    def images_to_x0(self, frozen, images):
        return jnp.transpose(images.astype(jnp.float32) / 127.5 - 1.0, (0, 3, 1, 2))

    def x0_to_images(self, frozen, x0):
        x = jnp.transpose(x0, (0, 2, 3, 1))
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def save(self, path, trainable):
        flat = {"w": np.asarray(trainable["denoiser"]["w"]), "b": np.asarray(trainable["denoiser"]["b"])}
        save_file(flat, os.path.join(path, "denoiser.safetensors"))
        with open(os.path.join(path, "throwaway.json"), "w") as f:
            json.dump({"width": self.width}, f)


FAMILY = Throwaway
'''


@pytest.fixture
def throwaway(tmp_path, monkeypatch) -> str:
    """The name of a family module written just now into a temporary package."""
    package = tmp_path / "throwaway_families"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "pixel.py").write_text(textwrap.dedent(THROWAWAY))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "throwaway_families"]:
        monkeypatch.delitem(sys.modules, name)  # another test's package, at another path
    return "throwaway_families.pixel"


def test_a_new_family_trains_and_exports_through_the_registry(throwaway, tmp_path):
    cfg = tiny_config()
    cfg.model.family = throwaway
    cfg.model.width = 8
    cfg.dropout.groups.caption.members = ("text",)
    cfg.dropout.nulls = {"text": "learned"}
    cfg.train.steps = 2
    assert registry.family_class(throwaway).__name__ == "Throwaway"
    workdir = str(tmp_path / "run")
    out = train_lib.train(cfg, workdir, progress=False)
    assert int(out["state"]["step"]) == 2 and [h["step"] for h in out["history"]] == [1, 2]
    assert os.path.exists(os.path.join(workdir, "samples_final.png"))
    with open(os.path.join(workdir, "masks.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1]

    manifest = export_lib.export(workdir, str(tmp_path / "export"), weights="raw")
    assert manifest["nulls"] == {"text": "learned"} and manifest["step"] == 2
    exported = load_file(str(tmp_path / "export" / "denoiser.safetensors"))
    trained = out["state"]["params"]["model"]["denoiser"]
    np.testing.assert_array_equal(exported["w"], np.asarray(trained["w"]))
    assert np.abs(exported["w"]).sum() > 0  # it trained: the zero init moved
    assert load_file(str(tmp_path / "export" / "nulls.safetensors"))["text"].shape == (8, 8)
    assert not os.path.exists(tmp_path / "export" / "model_index.json")  # no diffusers pipeline
    with pytest.raises(ConfigError, match="--single_file: this model family has no single-file layout"):
        export_lib.export(workdir, str(tmp_path / "export2"), single_file=True)

    bad = copy.deepcopy(cfg)
    bad.model.width = 0  # the family checks its own fields
    with pytest.raises(ConfigError, match=r"config.model.width = 0: must be an integer >= 1"):
        train_lib.build(bad, str(tmp_path / "bad"))


def test_unknown_family_names_are_refused(tmp_path, throwaway):
    with pytest.raises(ConfigError, match=r"config.model.family = 'sd9': no module jaxcond.models.sd9"):
        registry.family_class("sd9")
    (tmp_path / "throwaway_families" / "empty.py").write_text("X = 1\n")
    with pytest.raises(ConfigError, match=r"throwaway_families.empty defines no FAMILY"):
        registry.family_class("throwaway_families.empty")
