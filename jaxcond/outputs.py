"""Output folders made and proven writable before the work whose result they hold, and
files written under a temporary name and renamed when complete (on Cloud Storage: written
locally and uploaded whole)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator

from jaxcond import storage
from jaxcond.checks import ConfigError


def make_output_dir(path: str, what: str) -> None:
    """Creates the folder `path` (named by the flag or field `what`) and proves it writable,
    before the work whose result would otherwise be lost at the end."""
    if storage.is_url(path):  # a bucket has no folders to make: prove it takes objects
        storage.check_writable(path, what)
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a file, not a folder: choose another path")
    probe = os.path.join(path, f".write_test_{uuid.uuid4().hex}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{what} {path!r} is not writable ({e.strerror or e}): choose another path or "
                          "fix its permissions/space") from None


@contextlib.contextmanager
def atomic(path: str) -> Iterator[str]:
    """A temporary name beside `path` to write a file or folder under; renamed onto `path`
    when the block ends without error. A process killed meanwhile leaves the previous
    `path` (or none) and a `<path>.tmp-<pid>` that `remove_stale` clears, never a cut-off
    `path` that a rerun would take for complete. A folder replaces only a missing or empty
    folder (POSIX rename). On Cloud Storage the block writes a local temporary, uploaded
    object by object when it ends (an object is replaced whole or not at all)."""
    if storage.is_url(path):
        with storage.local_copy(path) as tmp:
            yield tmp
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def remove_stale(path: str) -> None:
    """Deletes what `atomic(path)` left behind in processes that were killed."""
    if storage.is_url(path):
        return  # uploads leave nothing behind
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(folder) if os.path.isdir(folder) else ():
        if entry.startswith(f"{name}.tmp-"):
            _remove(os.path.join(folder, entry))


_STALE = re.compile(r"\.tmp-\d+$")


def clear_stale(folder: str) -> int:
    """Deletes every temporary that `atomic` left in `folder` in processes that were killed;
    call it only where no other process is writing there. Returns how many it deleted."""
    if storage.is_url(folder) or not os.path.isdir(folder):
        return 0
    stale = [e for e in os.listdir(folder) if _STALE.search(e)]
    for entry in stale:
        _remove(os.path.join(folder, entry))
    return len(stale)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
