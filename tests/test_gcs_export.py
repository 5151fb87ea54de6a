"""`jaxcond export --out gs://...` against the GCS emulator: the same objects, byte for
byte, as a local export; an earlier export replaced whole; an upload cut short leaves no
manifest and is replaced by the rerun; a bad URL refused in one line before any work."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from jaxcond import export as export_lib, storage
from jaxcond.checks import ConfigError


@pytest.fixture(scope="module")
def run_dir(reference_run) -> str:
    """The session's 8-step run (checkpoints at 4 and 8); export only reads it."""
    return str(reference_run.workdir)


def _objects(url: str) -> dict[str, bytes]:
    """Every object under folder `url`, by its name relative to it."""
    prefix = url.removeprefix("gs://") + "/"
    return {k[len(prefix):]: storage.read_bytes("gs://" + k) for k in storage.fs().find(prefix)}


def _files(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/"): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def _cli_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxcond.cli", "export", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_export_to_a_bucket_matches_a_local_export(run_dir, gcs, tmp_path):
    url = gcs.url("export", "model")
    r = _cli_export("--workdir", run_dir, "--out", url)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"exported step 8 (ema weights) of {run_dir} to {url}" in r.stdout
    export_lib.export(run_dir, str(tmp_path / "model"))
    local = _files(tmp_path / "model")
    assert export_lib.MANIFEST in local and "unet/diffusion_pytorch_model.safetensors" in local
    assert _objects(url) == local  # no marker or probe left behind either

    r = _cli_export("--workdir", str(tmp_path / "no_run"), "--out", "gs://no-such-bucket/model")
    (line,) = r.stderr.splitlines()  # the bucket, before the (missing) run is even looked at
    assert line.startswith("jaxcond export: --out is not writable: gs://no-such-bucket/model: not found"), line


def test_a_rerun_replaces_an_earlier_or_cut_short_upload(run_dir, gcs, tmp_path, monkeypatch):
    url = gcs.url("export", "again")
    export_lib.export(run_dir, url, weights="raw", step=4)
    storage.upload(str(ROOT / "README.md"), storage.join(url, "unet", "stale.md"))  # not the new export's

    uploads, real_upload = [], storage.upload

    def killed_after_three(local, dest):
        if len(uploads) == 3:
            raise KeyboardInterrupt  # the process dies mid-upload
        uploads.append(dest)
        real_upload(local, dest)

    monkeypatch.setattr(storage, "upload", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        export_lib.export(run_dir, url)
    monkeypatch.setattr(storage, "upload", real_upload)
    left = storage.listdir(url)
    assert uploads[0] == storage.join(url, export_lib.UPLOADING)
    assert export_lib.UPLOADING in left and export_lib.MANIFEST not in left  # incomplete, and says so

    m = export_lib.export(run_dir, url)
    assert m["step"] == 8 and m["weights"] == "ema"
    export_lib.export(run_dir, str(tmp_path / "again"))
    assert _objects(url) == _files(tmp_path / "again")  # stale.md and the marker gone


def test_bad_bucket_folders_are_refused(run_dir, gcs):
    foreign = gcs.url("export", "foreign")
    storage.upload(str(ROOT / "README.md"), storage.join(foreign, "precious.md"))
    with pytest.raises(ConfigError, match=r"holds objects but is not an earlier export .*gcloud storage rm -r"):
        export_lib.export(run_dir, foreign)
    assert storage.listdir(foreign) == ["precious.md"]
    with pytest.raises(ConfigError, match="name a folder in the bucket"):
        export_lib.export(run_dir, gcs.url())
    with pytest.raises(ConfigError, match="only gs:// URLs are supported"):
        export_lib.export(run_dir, "s3://bucket/model")


def test_lora_adapters_to_a_bucket(config, gcs, tmp_path):
    """--lora --lora_format kohya names its file after the URL's last part, as after a folder's."""
    import copy

    from jaxcond import train as train_lib

    cfg = copy.deepcopy(config)
    cfg.train.steps, cfg.checkpoint.every_steps = 1, 1
    cfg.model.lora.rank, cfg.model.lora.alpha = 4, 8.0
    train_lib.train(cfg, str(tmp_path / "run"), progress=False)
    url = gcs.url("export", "adapters")
    m = export_lib.export(str(tmp_path / "run"), url, lora="kohya")
    assert m["lora"]["file"] == "adapters.safetensors"
    export_lib.export(str(tmp_path / "run"), str(tmp_path / "adapters"), lora="kohya")
    remote, local = _objects(url), _files(tmp_path / "adapters")
    assert remote.keys() == local.keys() and "adapters.safetensors" in remote
    for name, data in remote.items():
        same = _safetensors if name.endswith(".safetensors") else (lambda b: b)
        assert same(data) == same(local[name]), name


def _safetensors(data: bytes) -> tuple[dict, bytes]:
    """A .safetensors file's header and tensor bytes: its several metadata entries come out
    in another order from one write to the next (locally too), the tensors never."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]
