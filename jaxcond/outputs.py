"""Output folders: made and proven writable before the work whose result they hold."""

from __future__ import annotations

import os
import uuid

from jaxcond.checks import ConfigError


def make_output_dir(path: str, what: str) -> None:
    """Creates the folder `path` (named by the flag or field `what`) and proves it writable,
    before the work whose result would otherwise be lost at the end."""
    if "://" in path:  # os.makedirs would quietly make a local folder "gs:" instead
        raise ConfigError(f"{what} {path!r} is a URL, which is not supported yet (files are written "
                          "locally): use a path every host sees, e.g. a GCS FUSE mount (/gcs/BUCKET/run) or NFS")
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
