"""Atomic writes: a reader sees the old content or the new, never a mix.

Files and folders are written under a temporary sibling name (same parent,
so the final rename stays on one file system) and renamed into place once
complete. An exception while writing removes the temporary copy and leaves
the destination untouched.

A file is replaced with `os.replace` (atomic on POSIX and Windows). A
folder cannot be swapped atomically by `rename` when the destination
exists, so `replace_directory` moves the old folder aside, renames the new
one in, then deletes the old one; if the process dies between the two
renames, the complete old folder is left as `<name>.old-<id>` next to it
and the destination is missing, never half-written.
"""

import contextlib
import os
import shutil
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_destination(path, argument):
    path = os.fspath(path)
    if not path or os.path.basename(os.path.normpath(path)) in ("", ".", ".."):
        raise ValueError(
            f"`{argument}` must name a file or folder. Received: "
            f"{argument}={path!r}"
        )
    return os.path.normpath(path)


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Opens a temporary sibling of `path`; renames it to `path` on success.

    Example:
    >>> with atomic_file("cache.npz") as file:
    ...     np.savez(file, x=x)

    Args:
        path: the destination file.
        mode: "wb" or "w" (text, UTF-8).

    Raises:
        ValueError: for a mode that does not write, or if `path` is a
            folder.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"`mode` must be 'w' or 'wb'. Received: mode={mode!r}")
    path = _check_destination(path, "path")
    if os.path.isdir(path):
        raise ValueError(
            f"`path` is a folder, not a file. Received: path={path!r}"
        )
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent
    )
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates 0600 files; give the usual permissions.
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def replace_directory(source, destination):
    """Moves the complete folder `source` to `destination`, replacing it.

    Both must be on the same file system (use a sibling of `destination`
    for `source`). An existing `destination` is renamed aside first and
    deleted only once `source` is in place.
    """
    source = os.fspath(source)
    destination = _check_destination(destination, "destination")
    if os.path.exists(destination) and not os.path.isdir(destination):
        raise ValueError(
            "`destination` exists and is not a folder. Received: "
            f"destination={destination!r}"
        )
    old = None
    if os.path.isdir(destination):
        old = tempfile.mkdtemp(
            prefix=f".{os.path.basename(destination)}.old-",
            dir=os.path.dirname(destination) or ".",
        )
        os.rmdir(old)
        os.rename(destination, old)
    try:
        os.rename(source, destination)
    except BaseException:
        if old is not None:
            os.rename(old, destination)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path):
    """Yields a temporary sibling folder that replaces `path` on success.

    Example:
    >>> with atomic_directory("runs/x/preset") as folder:
    ...     model.save_to_preset(folder)

    On an exception the temporary folder is deleted and `path` (if it
    existed) is left as it was.
    """
    path = _check_destination(path, "path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"`path` exists and is not a folder. Received: path={path!r}"
        )
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent
    )
    try:
        # mkdtemp creates 0700 folders; give the usual permissions.
        os.chmod(temporary, 0o777 & ~_umask())
        yield temporary
        replace_directory(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
