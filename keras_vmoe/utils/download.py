"""Resumable, verified downloads (`urllib.request` only) into a cache.

`download_file` writes to `<path>.part` and renames it to `<path>` (with
`os.replace`) only once its size and hashes are verified, so a file at
`<path>` is always complete: it is reused without any network access. An
interrupted download keeps its `.part`, and the next call resumes it with
an HTTP `Range` request. Verified, where known: the size (`expected_size`,
`Content-Length` / `Content-Range`), `expected_sha256`, and the MD5 that
Google Cloud Storage sends in its `x-goog-hash` header (hashed over the
whole final file, so it also holds after a resume).

`download_vmoe_checkpoint` fetches a google-research/vmoe checkpoint: the
`.index` first, then the data shards it names.
"""

import base64
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

_BLOCK = 1 << 20
_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)


def default_cache_dir():
    """`$KERAS_VMOE_CACHE`, else `~/.cache/keras_vmoe/vmoe_checkpoints`."""
    return os.environ.get("KERAS_VMOE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_vmoe", "vmoe_checkpoints"
    )


def download_file(
    url,
    path,
    expected_size=None,
    expected_sha256=None,
    progress=True,
    timeout=60,
):
    """Downloads `url` to `path`, resuming and verifying (see the module).

    Args:
        url: an `http://` or `https://` URL.
        path: the destination file. An existing file there with the right
            size and hash (where known) is returned at once.
        expected_size: the size in bytes, if known.
        expected_sha256: the hex SHA-256, if known.
        progress: print "downloading <name>: done/total MB" to stderr about
            once a second and at the end.
        timeout: socket timeout in seconds.

    Returns:
        `path`.

    Raises:
        ConnectionError: for a network failure or an interrupted transfer
            (naming the URL; the partial data is kept at `<path>.part` and
            the next call resumes it), or a server error (HTTP 5xx).
        ValueError: naming the URL, the file and both values, for a size
            or hash mismatch (the partial file is deleted), or for an HTTP
            client error such as 404.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and _matches(path, expected_size, expected_sha256):
        return path
    part = path + ".part"
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if expected_size is not None and os.path.isfile(part):
        if os.path.getsize(part) > expected_size:
            os.remove(part)

    name = os.path.basename(path)
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    result = _fetch(
        url, path, part, offset, expected_size, name, progress, timeout
    )
    if result is _RESTART:  # A stale `.part`: start over once.
        _discard(part)
        result = _fetch(
            url, path, part, 0, expected_size, name, progress, timeout
        )
        if result is _RESTART:
            raise _connection_error(
                url, path, "the server does not answer the byte range asked for"
            )
    total, md5 = result
    _verify(url, path, part, total, expected_size, expected_sha256, md5)
    os.replace(part, path)
    return path


def download_vmoe_checkpoint(
    base_url, prefix_name, cache_dir=None, progress=True
):
    """Downloads a vmoe checkpoint (index, then shards) into a cache.

    Files already in the cache are reused without network access; an
    interrupted download resumes.

    Example:
    >>> prefix = download_vmoe_checkpoint(
    ...     "gs://vmoe_checkpoints", "vmoe_s32_last2_ilsvrc2012_randaug_light1")
    >>> params = read_vmoe_checkpoint(prefix)

    Args:
        base_url: the folder URL (`https://...`, `http://...`, or
            `gs://bucket/folder`, read through storage.googleapis.com).
        prefix_name: the checkpoint's prefix inside that folder, e.g.
            "vmoe_b16_imagenet21k_randaug_strong".
        cache_dir: the local folder; by default `$KERAS_VMOE_CACHE`, else
            `~/.cache/keras_vmoe/vmoe_checkpoints`.
        progress: print download progress to stderr.

    Returns:
        The local prefix (`<cache_dir>/<prefix_name>`), for
        `read_vmoe_checkpoint`.

    Raises:
        ConnectionError / ValueError: as `download_file`; ValueError also
            for an unreadable index (see `read_vmoe_index`) or a
            `prefix_name` that leaves `cache_dir`.
    """
    from keras_vmoe.converters.vmoe_format import read_vmoe_index

    parts = prefix_name.replace("\\", "/").split("/")
    if (
        not prefix_name
        or prefix_name.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ValueError(
            "`prefix_name` must be a relative name such as "
            f"'vmoe_b16_imagenet21k_randaug_strong'. Received: "
            f"prefix_name={prefix_name!r}"
        )
    cache_dir = os.fspath(cache_dir) if cache_dir else default_cache_dir()
    local_prefix = os.path.join(cache_dir, *parts)
    base_url = _http_url(base_url).rstrip("/")
    remote_prefix = f"{base_url}/{urllib.parse.quote(prefix_name)}"

    download_file(
        remote_prefix + ".index", local_prefix + ".index", progress=progress
    )
    index = read_vmoe_index(local_prefix)
    for shard_path in index.shard_paths():
        suffix = shard_path[len(local_prefix) :]
        download_file(remote_prefix + suffix, shard_path, progress=progress)
    missing = [p for p in index.shard_paths() if not os.path.isfile(p)]
    if missing:  # pragma: no cover - download_file raises first
        raise ValueError(f"Shards missing after download: {missing}")
    return local_prefix


# === Helpers ===
def _http_url(url):
    if url.startswith("gs://"):
        return "https://storage.googleapis.com/" + url[len("gs://") :]
    return url


_RESTART = object()


def _fetch(url, path, part, offset, expected_size, name, progress, timeout):
    """One GET (ranged when `offset`) into `part`.

    Returns (total size or None, x-goog-hash md5 or None), or `_RESTART`
    when the `.part` cannot be resumed.
    """
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            # Nothing left to send: the `.part` may be complete already.
            total = _content_range(error.headers.get("Content-Range"))[1]
            return (total, None) if total == offset else _RESTART
        _raise_http_error(url, path, error)
    except _NETWORK_ERRORS as error:
        raise _connection_error(url, path, error) from None
    with response:
        return _receive(
            url, path, part, response, offset, expected_size, name, progress
        )


def _receive(url, path, part, response, offset, expected_size, name, progress):
    """Streams `response` into `part`; returns (total size, md5 or None)."""
    total = None
    if offset and response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start != offset:
            return _RESTART
    else:
        offset = 0  # The whole file (a Range request answered with 200).
    length = response.headers.get("Content-Length", "").strip()
    if total is None and length.isdigit():
        total = offset + int(length)
    md5 = _goog_md5(response.headers)
    if (
        expected_size is not None
        and total is not None
        and total != expected_size
    ):
        _discard(part)
        raise ValueError(
            f"Refusing {url!r} for {path!r}: the server sends {total} bytes, "
            f"expected_size is {expected_size}. No file was written."
        )
    done = offset
    shown = time.monotonic()
    try:
        with open(part, "ab" if offset else "wb") as file:
            while True:
                block = response.read(_BLOCK)
                if not block:
                    break
                file.write(block)
                done += len(block)
                if progress and time.monotonic() - shown >= 1.0:
                    _show(name, done, total, end="")
                    shown = time.monotonic()
    except _NETWORK_ERRORS as error:
        if progress:
            sys.stderr.write("\n")
        raise _connection_error(url, path, error) from None
    if progress:
        _show(name, done, total, end="\n")
    if total is not None and done < total:
        raise _connection_error(
            url, path, f"the connection closed after {done} of {total} bytes"
        )
    return total, md5


def _verify(url, path, part, total, expected_size, expected_sha256, md5):
    size = os.path.getsize(part)
    checks = []
    if total is not None:
        checks.append(("size (server)", total, size))
    if expected_size is not None:
        checks.append(("size", expected_size, size))
    for what, expected, actual in checks:
        if expected != actual:
            _discard(part)
            raise ValueError(
                f"Download of {url!r} to {path!r} failed verification: "
                f"{what} expected {expected}, got {actual} bytes. The "
                "partial file was deleted."
            )
    if expected_sha256 is None and md5 is None:
        return
    sha256, file_md5 = _hashes(part)
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        _discard(part)
        raise ValueError(
            f"Download of {url!r} to {path!r} failed verification: sha256 "
            f"expected {expected_sha256.lower()}, got {sha256}. The file was "
            "deleted."
        )
    if md5 is not None and file_md5 != md5:
        _discard(part)
        raise ValueError(
            f"Download of {url!r} to {path!r} failed verification: md5 "
            f"(x-goog-hash) expected {md5}, got {file_md5}. The file was "
            "deleted."
        )


def _matches(path, expected_size, expected_sha256):
    if expected_size is not None and os.path.getsize(path) != expected_size:
        return False
    if expected_sha256 is not None:
        return _hashes(path)[0] == expected_sha256.lower()
    return True


def _hashes(path):
    """(sha256 hex, md5 base64) of a file."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as file:
        while block := file.read(_BLOCK):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), base64.b64encode(md5.digest()).decode("ascii")


def _goog_md5(headers):
    """The base64 MD5 of a Google Cloud Storage `x-goog-hash` header."""
    for value in headers.get_all("x-goog-hash") or ():
        for item in value.split(","):
            key, _, digest = item.strip().partition("=")
            if key.lower() == "md5" and digest:
                return digest
    return None


def _content_range(value):
    """'bytes START-END/TOTAL' (or 'bytes */TOTAL') -> (START, TOTAL).

    Either is None where absent or unreadable.
    """
    _, _, spec = (value or "").strip().partition(" ")
    span, _, total = spec.partition("/")
    start = span.split("-")[0].strip()
    total = total.strip()
    return (
        int(start) if start.isdigit() else None,
        int(total) if total.isdigit() else None,
    )


def _show(name, done, total, end):
    mb = 1e6
    total_text = f"{total / mb:.1f}" if total is not None else "?"
    sys.stderr.write(
        f"\rdownloading {name}: {done / mb:.1f}/{total_text} MB{end}"
    )
    sys.stderr.flush()


def _discard(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _connection_error(url, path, reason):
    part = path + ".part"
    kept = (
        f"The partial data is kept at {part!r} and the next call resumes "
        "from it."
        if os.path.isfile(part)
        else "No partial data was kept."
    )
    return ConnectionError(
        f"Could not download {url!r}: {reason}. {kept} Offline: download "
        f"{url} yourself and put it at {path!r}."
    )


def _raise_http_error(url, path, error):
    if error.code >= 500 or error.code == 429:
        raise _connection_error(url, path, f"HTTP {error.code} {error.reason}")
    raise ValueError(
        f"Could not download {url!r}: HTTP {error.code} {error.reason}. "
        f"Check the URL, or download it yourself and put it at {path!r}."
    ) from None
