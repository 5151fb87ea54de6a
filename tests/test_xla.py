"""jaxcond.xla: the CPU runtime settings, in processes with one CPU device (as the demo
runs), and the persistent compilation cache (a folder or a gs:// bucket)."""

import json
import os
import subprocess
import sys

from conftest import ROOT

# A program whose temporary buffer XLA must allocate at every call: the [8192, 2048] float32
# product (64 MiB, 16384 pages) is materialised before the second product reads it.
PROGRAM = """
import json, resource, sys
import jax, jax.numpy as jnp
from jaxcond import xla
applied = xla.cpu_runtime() if sys.argv[1] == "on" else None
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)
x, w, v = jnp.ones((8192, 64)) / 64, jnp.ones((64, 2048)), jnp.ones((2048, 8))
assert f.lower(x, w, v).compile().memory_analysis().temp_size_in_bytes >= 2**26
for _ in range(10):  # the heap grows to its working size
    y = f(x, w, v).block_until_ready()
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = f(x, w, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call: now and then the heap still grows by a block, whose pages fault once
# (a CI run averaged 1,701 faults a call over
# ten calls: one such block), whereas with jax's defaults every call faults.
print(json.dumps({"devices": jax.local_device_count(), "applied": applied, "faults": sorted(faults)[5],
                  "per_call": faults,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch"), "y": float(y.sum())}))
"""


def _calls(setting: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROGRAM, setting], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_runtime_reuses_the_temporary_buffer():
    """With jax's defaults every call maps its 64 MiB temporary afresh and faults in its
    pages (so this test fails if a jax release stops doing that, and the settings would be
    dead weight); after `cpu_runtime()` the calls reuse the memory, with the same results."""
    off, on = _calls("off"), _calls("on")
    assert off["devices"] == on["devices"] == 1
    assert off["async"] and not on["async"]
    assert on["applied"] is True
    assert off["faults"] > 10_000, off
    assert on["faults"] < 1_000, on
    assert on["y"] == off["y"]


# Compiles a program (every compile is stored: the minimum compile time is 0 here) and
# prints the cache directory in use, its cache hits and the program's result.
CACHED = """
import json, sys
import jax, jax.numpy as jnp
from jaxcond import xla
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
used = xla.compilation_cache(sys.argv[1])
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(64.0).reshape(8, 8) / 64)
print(json.dumps({"used": used, "hits": len(hits), "y": float(y)}))
"""


def _cache_env(**extra: str) -> dict:
    """This environment without the suite's cache folder, every compile stored."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return {**env, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def _cached(directory: str, env_dir: str | None = None) -> dict:
    env = _cache_env(XLA_FLAGS="", PYTHONPATH=str(ROOT))
    if env_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = env_dir
    out = subprocess.run([sys.executable, "-c", CACHED, directory], env=env, capture_output=True, text=True,
                         check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


def test_compilation_cache_serves_the_next_process(tmp_path):
    """A second process loads what the first compiled; an entry cut short (a process
    killed while jax wrote it) is compiled afresh with a warning, not loaded or fatal."""
    first, second = _cached(str(tmp_path / "c")), _cached(str(tmp_path / "c"))
    assert first["used"] == second["used"] == str(tmp_path / "c")
    assert first["hits"] == 0 and second["hits"] >= 1  # jnp's eager ops are programs too
    assert second["y"] == first["y"]
    entries = list((tmp_path / "c").iterdir())
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:entry.stat().st_size // 2])
    cut = _cached(str(tmp_path / "c"))
    assert cut["hits"] == 0 and cut["y"] == first["y"]
    assert "Error reading persistent compilation cache entry" in cut["stderr"]


def test_compilation_cache_defers_to_jax_and_can_be_off(tmp_path):
    """JAX_COMPILATION_CACHE_DIR (how the test suite keeps its cache) wins over the flag;
    an empty flag turns the cache off; an unwritable directory is named and skipped."""
    r = _cached(str(tmp_path / "flag"), env_dir=str(tmp_path / "env"))
    assert r["used"] == str(tmp_path / "env") and os.listdir(tmp_path / "env")
    assert not (tmp_path / "flag").exists()
    assert _cached("")["used"] is None
    (tmp_path / "file").write_text("")
    r = _cached(str(tmp_path / "file" / "cache"))
    assert r["used"] is None and r["hits"] == 0
    assert f"--compilation_cache {tmp_path / 'file' / 'cache'}" in r["stderr"]


def test_compilation_cache_in_a_bucket_serves_the_next_process(gcs):
    """--compilation_cache=gs://...: jax writes the entries as objects (the emulator here)
    and a second process loads them; a missing bucket is named and compiled without."""
    from jaxcond import storage

    url = gcs.url("xla", "jax_cache")
    first, second = _cached(url), _cached(url + "/")
    assert first["used"] == second["used"] == url
    assert first["hits"] == 0 and second["hits"] >= 1
    assert second["y"] == first["y"]
    assert any(name.endswith("-cache") for name in storage.listdir(url))
    r = _cached("gs://no-such-bucket/jax_cache")
    assert r["used"] is None and r["y"] == first["y"]
    assert "no compilation cache (--compilation_cache gs://no-such-bucket/jax_cache:" in r["stderr"]
    assert "gcloud storage buckets create gs://no-such-bucket" in r["stderr"]


def test_cli_turns_the_compilation_cache_on_and_refuses_other_urls(tmp_path):
    env = _cache_env()
    r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "masks", "--config", "configs/demo.py",
                        "--steps", "0:1", f"--compilation_cache={tmp_path / 'c'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / "c")
    for url, message in (("s3://bucket/jax_cache", "only gs:// URLs are supported"),
                         ("gs:///jax_cache", "names no bucket")):
        r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "masks", "--config", "configs/demo.py",
                            f"--compilation_cache={url}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and not r.stdout
        (line,) = r.stderr.splitlines()  # one line, no flag listing or traceback
        assert line.startswith(f"jaxcond masks: --compilation_cache {url!r}") and message in line, line
        assert not (ROOT / url.split("/")[0]).exists()
    (tmp_path / "a_file").write_text("")
    r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "masks", "--config", "configs/demo.py",
                        f"--compilation_cache={tmp_path / 'a_file'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and not r.stdout and "Traceback" not in r.stderr
    assert f"--compilation_cache {tmp_path / 'a_file'}: is a file, not a folder" in r.stderr
