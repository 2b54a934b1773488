"""Atomic files: written to a temporary file in the same folder, fsynced, then moved over the
target with os.replace, so a reader never sees a half-written file.

The result has the permissions a plain `open(path, "w")` would give it: an existing file keeps
its mode, a new one gets 0o666 minus the process umask (a bare `tempfile.mkstemp` file would
stay 0o600, unreadable to the group and others)."""
from __future__ import annotations

import json
import os
import stat
import tempfile


def current_umask() -> int:
    """The process umask. Read from /proc/self/status where Linux offers it (no side effect);
    elsewhere set and restored at once (`os.umask` has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_write_mode(path) -> int:
    """Permission bits `open(path, "w")` leaves `path` with: its current ones when it exists,
    else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def write_text_atomic(text: str, path, *, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (the folder is created if missing), with the mode of
    `plain_write_mode(path)`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = plain_write_mode(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def write_json_atomic(obj, path, *, indent: int = 1, sort_keys: bool = False, default=None,
                      trailing_newline: bool = False) -> None:
    """Write `obj` as JSON to `path` atomically (see `write_text_atomic`)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    write_text_atomic(text + "\n" if trailing_newline else text, path)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable where the platform allows it (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["write_json_atomic", "write_text_atomic", "plain_write_mode", "current_umask"]
