"""Where files live: a local path, or a Cloud Storage URL (gs://bucket/path).

The same functions serve both, so a run directory, a compilation cache, a dataset, a
latent cache or an export may be either. Objects are written whole (an upload replaces an
object atomically), so a killed process never leaves a cut-off object; the append-only
logs of a run on Cloud Storage are kept locally and appended to their objects with
server-side composes (`Mirror`).

Clients: gcsfs here, tensorstore inside Orbax for checkpoints, google-cloud-cpp inside
ArrayRecord for shards, and jax's own for the compilation cache. The standard
STORAGE_EMULATOR_HOST (a GCS emulator or private endpoint, e.g. http://127.0.0.1:9023)
is passed on to each of them at import, so one variable points them all at it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from jaxcond.checks import ConfigError

EMULATOR = "STORAGE_EMULATOR_HOST"


class StorageError(OSError):
    """Reading or writing Cloud Storage failed; the message names the URL and what to do.
    `reason`: "missing" (no such object or bucket), "denied" (401/403) or "other"."""

    def __init__(self, message: str, reason: str = "other"):
        super().__init__(message)
        self.reason = reason


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing"
    text = str(e).splitlines()[0] if str(e) else ""
    return "denied" if any(s in text for s in ("Forbidden", "401", "403", "Anonymous caller")) else "other"


def honour_emulator() -> None:
    """Points tensorstore (Orbax) and google-cloud-cpp (ArrayRecord) at STORAGE_EMULATOR_HOST,
    which gcsfs and jax read themselves. Settings a user made already are kept."""
    host = os.environ.get(EMULATOR)
    if host:
        host = host if "://" in host else f"http://{host}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
        os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", host)


honour_emulator()
# Orbax and jax reach gs:// through etils.epath's gcsfs, which by default caches folder
# listings for the life of the process: a checkpoint another process wrote since would stay
# invisible to a long-lived reader. fsspec applies these defaults to every gcsfs it makes.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)
# gcsfs logs a request that ran out of retries, traceback and all, then raises its error,
# which jaxcond reports in one line (StorageError): the log would only repeat it.
logging.getLogger("gcsfs").addFilter(lambda r: "out of retries" not in r.getMessage())


def is_url(path: str) -> bool:
    return "://" in str(path)


def check_url(path: str, what: str) -> None:
    """A ConfigError for a URL this module cannot use (another scheme, no bucket)."""
    if not is_url(path):
        return
    if not path.startswith("gs://"):
        raise ConfigError(f"{what} {path!r}: only gs:// URLs are supported (Cloud Storage); use gs://BUCKET/... "
                          "or a local or mounted folder")
    if not path[len("gs://"):].split("/")[0]:
        raise ConfigError(f"{what} {path!r} names no bucket: use gs://BUCKET/path")


def join(base: str, *names: str) -> str:
    return posixpath.join(base, *names) if is_url(base) else os.path.join(base, *names)


def absolute(path: str) -> str:
    """`path` made absolute (a URL is already)."""
    return path.rstrip("/") if is_url(path) else os.path.abspath(os.path.expanduser(path))


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(os.path.abspath(path))


@functools.lru_cache(maxsize=None)
def _fs(emulator: str | None) -> Any:
    import gcsfs

    # An emulator takes no credentials; elsewhere the machine's (a TPU VM's service account,
    # `gcloud auth application-default login`), never a silent anonymous fallback.
    return gcsfs.GCSFileSystem(token="anon" if emulator else "google_default", use_listings_cache=False,
                               skip_instance_cache=True)


def fs() -> Any:
    """The gcsfs filesystem for gs:// URLs (one per emulator setting)."""
    try:
        return _fs(os.environ.get(EMULATOR))
    except Exception as e:  # noqa: BLE001 - google.auth raises its own types
        raise StorageError(
            f"no Google Cloud credentials found ({type(e).__name__}): on a TPU VM the VM's service account "
            "is used; elsewhere run `gcloud auth application-default login` or set "
            "GOOGLE_APPLICATION_CREDENTIALS") from None


def _key(url: str) -> str:
    return url[len("gs://"):].rstrip("/")


def describe(e: BaseException, url: str) -> str:
    """One line for a failed access to `url`: what happened and what to do."""
    bucket = _key(url).split("/")[0]
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    reason = _reason(e)
    if reason == "missing":
        return f"{url}: not found (does bucket gs://{bucket} exist? create it with `gcloud storage buckets create gs://{bucket}`)"
    if reason == "denied":
        return (f"{url}: permission denied ({text}); give this machine's account write access to "
                f"gs://{bucket} (roles/storage.objectAdmin)")
    return f"{url}: {type(e).__name__}: {text} (is Cloud Storage reachable from here?)"


@contextlib.contextmanager
def _errors(url: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise StorageError(describe(e, url), _reason(e)) from e
    except Exception as e:  # noqa: BLE001 - aiohttp and gcsfs raise their own types for network faults
        if type(e).__module__.split(".")[0] in ("aiohttp", "gcsfs", "google", "requests", "asyncio"):
            raise StorageError(describe(e, url), _reason(e)) from e
        raise


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with _errors(path):
        return fs().exists(_key(path))


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    with _errors(path):
        return fs().isdir(_key(path))


def listdir(path: str) -> list[str]:
    """Names in folder `path` (none if it does not exist)."""
    if not is_url(path):
        return os.listdir(path) if os.path.isdir(path) else []
    return sorted(n for n in stat_folder(path) if n)


def remove(path: str) -> None:
    """Deletes file or folder `path` if it exists."""
    if not is_url(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    with _errors(path), contextlib.suppress(FileNotFoundError):
        fs().rm(_key(path), recursive=True)


def open_file(path: str, mode: str = "r") -> IO:
    """Opens a file or object for reading (mode "r" or "rb")."""
    if not is_url(path):
        return open(path, mode)
    with _errors(path):
        return fs().open(_key(path), mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Writes object `url` whole."""
    with _errors(url):
        fs().pipe_file(_key(url), data)


def read_ranges(paths: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
    """Bytes [start, end) of each file or object (all local, or all URLs); the objects'
    ranges are fetched concurrently, so a host reads only the parts it needs at the cost
    of about one request's latency."""
    if paths and is_url(paths[0]):
        with _errors(paths[0]):
            out = fs().cat_ranges([_key(p) for p in paths], list(starts), list(ends))
            failed = [r for r in out if isinstance(r, BaseException)]  # fsspec returns failures in the list
            if failed:
                raise failed[0]
            return out
    out = []
    for path, start, end in zip(paths, starts, ends):
        with open(path, "rb") as f:
            f.seek(start)
            out.append(f.read(end - start))
    return out


def stat_folder(url: str) -> dict[str, tuple[int, str] | None]:
    """Each name in folder `url` (a gs:// URL) with its object's (size in bytes,
    generation), None for a sub-folder; empty if there is none. One listing answers for
    all of a folder's objects, where asking object by object takes a request each."""
    with _errors(url):
        try:
            entries = fs().ls(_key(url), detail=True)
        except FileNotFoundError:
            return {}
    return {posixpath.basename(e["name"].rstrip("/")): None if e["type"] == "directory"
            else (int(e["size"]), str(e.get("generation", e.get("updated", "")))) for e in entries}


def upload(local: str, url: str) -> None:
    """Copies file or folder `local` to `url`, each object in one upload (whole or absent)."""
    with _errors(url):
        if os.path.isdir(local):
            for dirpath, _, names in os.walk(local):
                for n in sorted(names):
                    src = os.path.join(dirpath, n)
                    fs().put_file(src, _key(join(url, os.path.relpath(src, local).replace(os.sep, "/"))))
        else:
            fs().put_file(local, _key(url))


def download(url: str, local: str) -> None:
    with _errors(url):
        fs().get(_key(url), local, recursive=True)


def local_folder(url: str) -> str:
    """A local copy of folder `url` (a model, say) for libraries that read only local files,
    downloaded once into ~/.cache/jaxcond/gcs (XDG_CACHE_HOME) and reused while the folder's
    objects (names, sizes, checksums) are unchanged."""
    with _errors(url):
        objects = fs().find(_key(url), detail=True)
    if not objects:
        raise FileNotFoundError(f"{url} holds no files")
    listing = sorted((k, o.get("size"), o.get("md5Hash") or o.get("crc32c")) for k, o in objects.items())
    digest = hashlib.sha256(repr((url, listing)).encode()).hexdigest()[:24]
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxcond", "gcs")
    local = os.path.join(root, f"{posixpath.basename(_key(url))}-{digest}")
    if not os.path.isdir(local):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".download-")
        try:
            prefix = _key(url) + "/"
            with _errors(url):
                for key in objects:
                    dest = os.path.join(tmp, *key[len(prefix):].split("/"))
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    fs().get_file(key, dest)
            os.replace(tmp, local)  # whole or not at all, also when two processes race
        except OSError:
            if not os.path.isdir(local):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def check_writable(url: str, what: str) -> None:
    """Proves `url` (a folder) writable with a probe object, before work whose result it
    would hold; a ConfigError naming the URL and the fix otherwise."""
    check_url(url, what)
    probe = join(url, f".write_test_{uuid.uuid4().hex}")
    try:
        with _errors(url):
            fs().pipe_file(_key(probe), b"ok")
            fs().rm_file(_key(probe))
    except StorageError as e:
        raise ConfigError(f"{what} is not writable: {e}") from None


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local temporary path to write a file or folder under; uploaded to `url` when the
    block ends without error."""
    with tempfile.TemporaryDirectory(prefix="jaxcond-upload-") as tmp:
        path = os.path.join(tmp, "out")
        yield path
        upload(path, url)


class Mirror:
    """The append-only log files of a folder on Cloud Storage (JSON lines, TensorBoard
    events), written in a local folder and appended to their objects by `sync`.

    A kill loses what was written after the last `sync`; train syncs before each
    checkpoint, so the logs hold every step before the newest complete checkpoint, and
    the resume rule (drop the lines of steps that will run again) stays exact."""

    def __init__(self, url: str):
        self.url = url
        self.local = tempfile.mkdtemp(prefix="jaxcond-logs-")
        self.synced: dict[str, int] = {}  # relative path -> bytes already in its object
        # Removed also when an error ends the run before `close`.
        self._remove = weakref.finalize(self, shutil.rmtree, self.local, True)

    def fetch(self, name: str) -> str:
        """Downloads object `name` (if it exists) into the local folder; its local path."""
        local = os.path.join(self.local, name)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if exists(join(self.url, name)):
            download(join(self.url, name), local)
            self.synced[name] = os.path.getsize(local)
        return local

    def replace(self, name: str) -> None:
        """Uploads local file `name` whole, replacing its object (after a rewrite)."""
        upload(os.path.join(self.local, name), join(self.url, name))
        self.synced[name] = os.path.getsize(os.path.join(self.local, name))

    def sync(self) -> None:
        """Appends every local file's new bytes to its object (a new file is uploaded)."""
        for dirpath, _, names in os.walk(self.local):
            for n in sorted(names):
                path = os.path.join(dirpath, n)
                name = os.path.relpath(path, self.local).replace(os.sep, "/")
                size, done = os.path.getsize(path), self.synced.get(name, 0)
                if size == done:
                    continue
                url = join(self.url, name)
                if not done:
                    upload(path, url)
                else:
                    with open(path, "rb") as f:
                        f.seek(done)
                        tail = f.read(size - done)
                    part = f"{url}.part-{uuid.uuid4().hex}"
                    with _errors(url):
                        fs().pipe_file(_key(part), tail)
                        fs().merge(_key(url), [_key(url), _key(part)])  # compose: atomic, server-side
                        fs().rm_file(_key(part))
                self.synced[name] = size

    def close(self) -> None:
        self._remove()
