"""jaxcond.storage against a real GCS API (the emulator on the loopback address): the
same functions for local paths and gs:// URLs, whole-object writes, appended logs, and a
one-line error for each bad URL."""

import os

import pytest

from jaxcond import outputs, storage
from jaxcond.checks import ConfigError


def test_files_objects_and_folders(gcs, tmp_path):
    base = gcs.url("storage", "basic")
    with outputs.atomic(storage.join(base, "a.txt")) as tmp, open(tmp, "w") as f:
        f.write("hello")
    assert storage.read_bytes(storage.join(base, "a.txt")) == b"hello"
    with outputs.atomic(storage.join(base, "folder")) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        open(os.path.join(tmp, "sub", "b.bin"), "wb").write(b"\0\1")
    assert storage.listdir(base) == ["a.txt", "folder"]
    assert storage.isdir(storage.join(base, "folder")) and not storage.isdir(storage.join(base, "a.txt"))
    assert storage.read_bytes(storage.join(base, "folder", "sub", "b.bin")) == b"\0\1"
    storage.remove(storage.join(base, "folder"))
    assert storage.listdir(base) == ["a.txt"] and not storage.exists(storage.join(base, "folder"))
    storage.download(storage.join(base, "a.txt"), str(tmp_path / "a.txt"))
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert storage.listdir(gcs.url("storage", "none")) == []


def test_an_error_inside_atomic_uploads_nothing(gcs):
    url = gcs.url("storage", "never.txt")
    with pytest.raises(KeyError), outputs.atomic(url) as tmp:
        open(tmp, "w").write("half")
        raise KeyError
    assert not storage.exists(url)


def test_mirror_appends_with_composes_and_resumes(gcs):
    url = gcs.url("storage", "mirror")
    m = storage.Mirror(url)
    with open(os.path.join(m.local, "log.jsonl"), "w") as f:
        f.write("1\n")
    m.sync()
    with open(os.path.join(m.local, "log.jsonl"), "a") as f:
        f.write("2\n")
    os.makedirs(os.path.join(m.local, "tb"))
    open(os.path.join(m.local, "tb", "events"), "wb").write(b"e1")
    m.sync()
    m.sync()  # nothing new: nothing appended twice
    assert storage.read_bytes(storage.join(url, "log.jsonl")) == b"1\n2\n"
    assert storage.read_bytes(storage.join(url, "tb", "events")) == b"e1"
    assert storage.listdir(url) == ["log.jsonl", "tb"]  # no compose parts left
    m.close()
    again = storage.Mirror(url)  # a restarted process
    path = again.fetch("log.jsonl")
    assert open(path).read() == "1\n2\n"
    open(path, "w").write("1\n")
    again.replace("log.jsonl")
    open(path, "a").write("3\n")
    again.sync()
    assert storage.read_bytes(storage.join(url, "log.jsonl")) == b"1\n3\n"
    again.close()


def test_bad_urls_are_one_line_errors(gcs):
    outputs.make_output_dir(gcs.url("storage", "ok"), "--workdir")
    with pytest.raises(ConfigError, match=r"--workdir is not writable: gs://no-such-bucket/run: not found .*"
                                          r"gcloud storage buckets create gs://no-such-bucket"):
        outputs.make_output_dir("gs://no-such-bucket/run", "--workdir")
    with pytest.raises(ConfigError, match="only gs:// URLs are supported"):
        outputs.make_output_dir("s3://bucket/run", "--workdir")
    with pytest.raises(ConfigError, match="names no bucket"):
        outputs.make_output_dir("gs:///run", "--workdir")


def test_missing_credentials_are_named(monkeypatch, tmp_path):
    """Away from an emulator, a machine with no Google credentials gets told how to get some."""
    monkeypatch.delenv(storage.EMULATOR, raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata server here: do not wait for one
    storage._fs.cache_clear()
    with pytest.raises(ConfigError, match="no Google Cloud credentials found.*application-default login"):
        outputs.make_output_dir("gs://some-bucket/run", "--workdir")
