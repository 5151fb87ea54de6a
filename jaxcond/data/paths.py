"""Where a dataset's files are: a local path, or an object on Cloud Storage (a gs:// URL,
through jaxcond.storage), each with one answer to "can it be read?": None, or why not,
which `jaxcond.data.files` counts as a skip.

A local path is checked with os.stat before it is opened (a named pipe would block). An
object is read whole; one that does not exist or that this machine may not read is
skipped like a missing or unreadable file, while any other storage fault (network,
credentials) stops with its one-line StorageError rather than skipping images silently.
The objects a metadata file names are checked from one listing per folder (`Objects`),
not a request each."""

from __future__ import annotations

import errno
import os
import posixpath
import stat

from jaxcond import storage


def os_problem(e: OSError, path: str | None = None) -> str:
    """What an OSError on `path` means to a user, e.g. "unreadable (permission denied)"."""
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return "broken symlink" if path and os.path.islink(path) else "no such file"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "unreadable (permission denied)"
    return f"unreadable ({(e.strerror or type(e).__name__).lower()})"


_SPECIAL = {stat.S_IFIFO: "named pipe", stat.S_IFSOCK: "socket", stat.S_IFCHR: "device", stat.S_IFBLK: "device"}


def path_problem(path: str, *, empty_ok: bool = False) -> str | None:
    """Why `path` cannot be read as a file, from os.stat alone; None if it can."""
    try:
        st = os.stat(path)
    except OSError as e:
        return os_problem(e, path)
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a file"
    if not stat.S_ISREG(st.st_mode):  # never opened: opening a named pipe blocks forever
        return f"not a regular file ({_SPECIAL.get(stat.S_IFMT(st.st_mode), 'special file')})"
    return "zero-byte file" if st.st_size == 0 and not empty_ok else None


def read_object(url: str) -> tuple[bytes | None, str | None]:
    """(object `url`'s bytes, None), or (None, why it cannot be read)."""
    try:
        return storage.read_bytes(url), None
    except storage.StorageError as e:
        return None, _object_problem(e)


def _object_problem(e: storage.StorageError) -> str:
    """A missing or forbidden object as the skip a local file would get; other faults raise."""
    if e.reason == "missing":
        return "no such file"
    if e.reason == "denied":
        return "unreadable (permission denied)"
    raise e


class Objects:
    """Sizes and generations of gs:// objects, from one listing of each folder they are in
    (a metadata file names thousands of images in a few folders)."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, tuple[int, str] | None]] = {}

    def _entry(self, url: str) -> tuple[int, str] | None | str:
        folder, name = posixpath.split(url)
        if folder not in self._folders:
            self._folders[folder] = storage.stat_folder(folder)
        return self._folders[folder].get(name, "missing")

    def stat(self, url: str) -> tuple[int, str] | None:
        """(size, generation) of object `url`; None if there is no such object."""
        entry = self._entry(url)
        return entry if isinstance(entry, tuple) else None

    def problem(self, url: str) -> str | None:
        """Why `url` cannot be read as an image (as `path_problem` says for a file); None if it can."""
        entry = self._entry(url)
        if entry == "missing":
            return "no such file"
        if entry is None:
            return "a folder, not a file"
        return "zero-byte file" if entry[0] == 0 else None


def join(base: str, name: str) -> str:
    """Metadata `file_name` `name` resolved against the metadata's folder `base`: a gs://
    URL stays as it is; under a gs:// folder `.` and `..` are resolved here, as the local
    file system does for a path (object names would keep them literally)."""
    if storage.is_url(name):
        return name
    if not storage.is_url(base) or name.startswith("/"):
        return os.path.join(base, name)
    bucket, _, key = base[len("gs://"):].partition("/")
    return f"gs://{bucket}/" + posixpath.normpath(posixpath.join("/", key, name)).lstrip("/")


def dirname(path: str) -> str:
    return posixpath.dirname(path) if storage.is_url(path) else os.path.dirname(path)


def isfile(path: str) -> bool:
    return storage.exists(path) and not storage.isdir(path) if storage.is_url(path) else os.path.isfile(path)


def relative(path: str, base: str) -> tuple[str, bool]:
    """`path` as a key relative to folder `base` (one file, one key), and whether it lies
    outside `base`."""
    if storage.is_url(path) or storage.is_url(base):
        inside = path.startswith(base.rstrip("/") + "/")
        return (path[len(base.rstrip("/")) + 1:] if inside else path), not inside
    key = os.path.normpath(os.path.relpath(path, base or os.curdir))
    return key, key == os.pardir or key.startswith(os.pardir + os.sep)
