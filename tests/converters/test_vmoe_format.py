"""The vmoe checkpoint reader and the resumable, verified downloader.

The real fixture `tests/fixtures/vmoe/tiny_every2_k1` was written by
google-research/vmoe's own writer (see its README.md); the other
checkpoints come from the independent test writer `vmoe_writer.py`. The
downloads run against a local HTTP server on 127.0.0.1 only.
"""

import ast
import base64
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading

import ml_dtypes
import numpy as np
import pytest

from keras_vmoe.converters.vmoe_format import read_vmoe_checkpoint
from keras_vmoe.converters.vmoe_format import read_vmoe_index
from keras_vmoe.utils.download import download_file
from keras_vmoe.utils.download import download_vmoe_checkpoint
from tests.converters import vmoe_writer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "vmoe")
FIXTURE = os.path.join(FIXTURES, "tiny_every2_k1")
MODULE_FILE = os.path.join(ROOT, "keras_vmoe", "converters", "vmoe_format.py")


def _params():
    with open(os.path.join(FIXTURES, "fixtures.json")) as file:
        return json.load(file)["tiny_every2_k1"]["params"]


# === The real fixture ===
def test_reads_the_fixture_written_by_vmoe():
    index = read_vmoe_index(FIXTURE + ".index")
    assert index.version == "20220622"
    assert index.shard_count == 2
    assert index.shard_paths() == [
        FIXTURE + ".data-00000-of-00002",
        FIXTURE + ".data-00001-of-00002",
    ]
    params = _params()
    # The tree's top level is the flax params dict itself (no 'params/').
    assert list(dict.fromkeys(p.split("/")[0] for p in index.entries)) == [
        "Encoder",
        "cls",
        "embedding",
        "head",
    ]
    assert set(index.entries) == set(params)
    arrays = read_vmoe_checkpoint(FIXTURE)
    assert list(arrays) == list(index.entries)
    for path, shape in params.items():
        assert arrays[path].shape == tuple(shape), path
        assert index.entries[path].shape == tuple(shape), path
        assert arrays[path].dtype == np.float32, path
        assert np.all(np.isfinite(arrays[path])), path
    # Random, well-spread weights: nothing left unwritten.
    assert arrays["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"].std() > 0
    assert set(s for e in index.entries.values() for s in e.shards) == {0, 1}
    subset = read_vmoe_checkpoint(FIXTURE, keys=["head/kernel", "cls"])
    assert list(subset) == ["cls", "head/kernel"]
    np.testing.assert_array_equal(subset["cls"], arrays["cls"])


# === Round trips through the test writer ===
def _tree(rng):
    bf16 = rng.normal(size=(6, 3)).astype(ml_dtypes.bfloat16)
    layers = {
        str(i): {"kernel": rng.normal(size=(3 + i % 2, 4)).astype(np.float32)}
        for i in range(12)
    }
    return {
        "zeta": {"w": rng.normal(size=(5, 2, 3)).astype(np.float32)},
        "layers": layers,
        "alpha": {
            "bf16": bf16,
            "step": np.asarray(7, np.int32),
            "scalar": np.asarray(1.5, np.float32),
        },
    }


def _flat(tree):
    return {"/".join(k): v for k, v in vmoe_writer.flatten(tree)}


def _assert_same(arrays, tree):
    expected = _flat(tree)
    assert list(arrays) == list(expected)  # the file's order, not sorted
    for path, value in expected.items():
        assert arrays[path].dtype == value.dtype, path
        assert arrays[path].shape == value.shape, path
        # Bit-exact (bfloat16 included).
        assert arrays[path].tobytes() == value.tobytes(), path


@pytest.mark.parametrize(
    "options",
    [
        dict(num_shards=1),
        dict(num_shards=3, chunks_per_array=2, subchunk_items=5),
        dict(num_shards=4, chunks_per_array=3, version=None),
        dict(num_shards=2, chunks_per_array=2, flax_chunked=True),
    ],
    ids=["one_shard", "split_over_shards", "old_index", "flax_chunked"],
)
def test_round_trip(tmp_path, options):
    tree = _tree(np.random.default_rng(0))
    prefix = str(tmp_path / "ckpt")
    vmoe_writer.write_vmoe_checkpoint(prefix, tree, **options)
    index = read_vmoe_index(prefix)
    assert index.version == options.get("version", "20220622")
    assert index.shard_count == options["num_shards"]
    entry = index.entries["zeta/w"]
    assert entry.dtype == np.float32 and entry.shape == (5, 2, 3)
    chunks = min(options.get("chunks_per_array", 1), 5)
    assert len(entry.slices) == chunks
    assert index.entries["alpha/bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert index.entries["alpha/step"].slices == [()]
    arrays = read_vmoe_checkpoint(prefix)
    _assert_same(arrays, tree)
    assert arrays["alpha/step"].shape == () and arrays["alpha/step"] == 7
    # 12 list-like layers: '10' and '11' come after '9', as written.
    layer_paths = [p for p in arrays if p.startswith("layers/")]
    assert layer_paths == [f"layers/{i}/kernel" for i in range(12)]


def test_leaf_order_is_the_files_order_not_sorted(tmp_path):
    # Same shapes and dtypes everywhere: only the order maps chunks to
    # arrays, and each value tells which array it is.
    tree = {
        key: np.full((2,), i, np.float32)
        for i, key in enumerate(["b", "a", "d", "c", "10", "2", "1"])
    }
    prefix = str(tmp_path / "ckpt")
    vmoe_writer.write_vmoe_checkpoint(prefix, tree, num_shards=2)
    arrays = read_vmoe_checkpoint(prefix)
    assert list(arrays) == list(tree)
    for key, value in tree.items():
        np.testing.assert_array_equal(arrays[key], value)


def test_keys_reads_only_the_shards_needed(tmp_path):
    tree = {"a": np.arange(4.0, dtype=np.float32), "b": np.ones(3, np.int32)}
    prefix = str(tmp_path / "ckpt")
    paths = vmoe_writer.write_vmoe_checkpoint(prefix, tree, num_shards=2)
    os.remove(paths[1])  # holds "b" only
    arrays = read_vmoe_checkpoint(prefix, keys=["a"])
    assert list(arrays) == ["a"]
    with pytest.raises(ValueError, match="no parameter.*'nope'"):
        read_vmoe_checkpoint(prefix, keys=["a", "nope"])


# === Errors name the file ===
@pytest.fixture
def checkpoint(tmp_path):
    tree = {
        "enc": {"kernel": np.arange(24, dtype=np.float32).reshape(6, 4)},
        "head": {"bias": np.arange(3, dtype=np.float32)},
    }
    prefix = str(tmp_path / "ckpt")
    paths = vmoe_writer.write_vmoe_checkpoint(
        prefix, tree, num_shards=2, chunks_per_array=2
    )
    return prefix, paths


def test_missing_index(tmp_path):
    prefix = str(tmp_path / "none")
    with pytest.raises(ValueError, match="index not found.*none.index"):
        read_vmoe_checkpoint(prefix)


def test_missing_shard(checkpoint):
    prefix, paths = checkpoint
    os.remove(paths[1])
    with pytest.raises(ValueError) as error:
        read_vmoe_checkpoint(prefix)
    assert repr(paths[1]) in str(error.value)
    assert "expects 2 shard(s)" in str(error.value)


def test_truncated_shard(checkpoint):
    prefix, paths = checkpoint
    with open(paths[0], "rb") as file:
        data = file.read()
    with open(paths[0], "wb") as file:
        file.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as error:
        read_vmoe_checkpoint(prefix)
    assert repr(paths[0]) in str(error.value)


@pytest.mark.parametrize("which", ["index", "shard"])
def test_garbage_bytes(checkpoint, which):
    prefix, paths = checkpoint
    path = prefix + ".index" if which == "index" else paths[0]
    with open(path, "wb") as file:
        file.write(b"\xc1 this is not msgpack \x00\xff" * 3)
    with pytest.raises(ValueError, match="truncated or corrupt") as error:
        read_vmoe_checkpoint(prefix)
    assert repr(path) in str(error.value)


@pytest.mark.parametrize("which", ["index", "shard"])
def test_lfs_pointer(checkpoint, which):
    prefix, paths = checkpoint
    path = prefix + ".index" if which == "index" else paths[1]
    with open(path, "w") as file:
        file.write(
            "version https://git-lfs.github.com/spec/v1\n"
            "oid sha256:" + "0" * 64 + "\nsize 1234\n"
        )
    with pytest.raises(ValueError, match="Git LFS pointer") as error:
        read_vmoe_checkpoint(prefix)
    assert repr(path) in str(error.value)


def _edit_shard(path, edit):
    content = vmoe_writer.read_raw(path)
    edit(content)
    vmoe_writer.write_raw(path, content)


def test_shard_chunk_slice_disagrees_with_index(checkpoint):
    prefix, paths = checkpoint
    # Array 0 (enc/kernel, [6, 4]) has chunks [0:3] in shard 0, [3:6] in 1.

    def shift(content):
        content["0"][0][1] = vmoe_writer.encode_slice_nd(((1, 4), (0, 4)))

    _edit_shard(paths[0], shift)
    with pytest.raises(ValueError) as error:
        read_vmoe_checkpoint(prefix)
    message = str(error.value)
    assert repr(paths[0]) in message and "ckpt.index" in message
    assert "'enc/kernel'" in message and "(6, 4)" in message
    assert "[1:4, 0:4]" in message and "disagree" in message


def test_shard_chunk_in_the_wrong_shard(checkpoint):
    prefix, paths = checkpoint
    moved = {}
    _edit_shard(paths[1], lambda c: moved.update(chunks=c.pop("0")))
    _edit_shard(paths[0], lambda c: c["0"].extend(moved["chunks"]))
    with pytest.raises(
        ValueError, match="'enc/kernel'.*\\[3:6, 0:4\\] in shard 0"
    ):
        read_vmoe_checkpoint(prefix)


def test_shard_missing_a_chunk(checkpoint):
    prefix, paths = checkpoint
    _edit_shard(paths[1], lambda c: c.pop("1"))
    with pytest.raises(ValueError, match="lacks 1 chunk.*'head/bias'") as error:
        read_vmoe_checkpoint(prefix)
    assert repr(paths[1]) in str(error.value)


def test_chunk_of_the_wrong_size(checkpoint):
    prefix, paths = checkpoint

    def shrink(content):
        content["0"][0][0] = [
            vmoe_writer.encode_ndarray(np.zeros(5, np.float32))
        ]

    _edit_shard(paths[0], shrink)
    with pytest.raises(
        ValueError, match="'enc/kernel'.*holds 5 values.*\\(3, 4\\)"
    ):
        read_vmoe_checkpoint(prefix)


def test_buffer_size_and_dtype_and_ext_errors(checkpoint):
    prefix, paths = checkpoint
    bad = vmoe_writer.encode_ndarray(np.zeros(12, np.float32), shape=(13,))
    _edit_shard(paths[0], lambda c: c["0"][0].__setitem__(0, [bad]))
    with pytest.raises(
        ValueError, match="shape \\(13,\\).*needs 52 bytes.*holds 48"
    ) as error:
        read_vmoe_checkpoint(prefix)
    assert repr(paths[0]) in str(error.value)

    unknown = vmoe_writer.encode_ndarray(
        np.zeros(12, np.float32), dtype_name="float33"
    )
    _edit_shard(paths[0], lambda c: c["0"][0].__setitem__(0, [unknown]))
    with pytest.raises(ValueError, match="unknown dtype name 'float33'"):
        read_vmoe_checkpoint(prefix)

    obj = vmoe_writer.encode_ndarray(
        np.zeros(12, np.float32), dtype_name="object"
    )
    _edit_shard(paths[0], lambda c: c["0"][0].__setitem__(0, [obj]))
    with pytest.raises(ValueError, match="unknown dtype name 'object'"):
        read_vmoe_checkpoint(prefix)

    import msgpack

    _edit_shard(
        paths[0], lambda c: c.__setitem__("0", msgpack.ExtType(42, b""))
    )
    with pytest.raises(
        ValueError, match="unknown msgpack extension type 42"
    ) as error:
        read_vmoe_checkpoint(prefix)
    assert repr(paths[0]) in str(error.value)


def test_index_whose_chunks_do_not_tile_the_array(tmp_path):
    prefix = str(tmp_path / "ckpt")
    vmoe_writer.write_vmoe_checkpoint(
        prefix, {"w": np.zeros((4, 2), np.float32)}
    )
    for slices, problem in [
        ([((0, 3), (0, 2)), ((2, 4), (0, 2))], "overlapping"),
        ([((0, 1), (0, 2)), ((2, 4), (0, 2))], "a gap"),
        ([((0, 5), (0, 2))], "outside the array"),
    ]:
        info = vmoe_writer.encode_index_info(
            (4, 2), "float32", slices, [0] * len(slices)
        )
        vmoe_writer.write_raw(
            prefix + ".index",
            {"shard_count": 1, "index": {"w": info}, "version": "20220622"},
        )
        with pytest.raises(
            ValueError, match=f"ckpt.index.*'w'.*\\(4, 2\\).*{problem}"
        ):
            read_vmoe_index(prefix)


def test_old_index_with_named_shape_and_unsupported_version(tmp_path):
    prefix = str(tmp_path / "ckpt")
    vmoe_writer.write_vmoe_checkpoint(prefix, {"w": np.ones(3, np.float32)})
    info = vmoe_writer.encode_index_info(
        (3,), "float32", [((0, 3),)], [0], named_shape={"batch": 2}
    )
    vmoe_writer.write_raw(
        prefix + ".index", {"shard_count": 1, "index": {"w": info}}
    )
    assert read_vmoe_index(prefix).version is None
    np.testing.assert_array_equal(read_vmoe_checkpoint(prefix)["w"], np.ones(3))
    vmoe_writer.write_raw(
        prefix + ".index",
        {"shard_count": 1, "index": {"w": info}, "version": "20990101"},
    )
    with pytest.raises(
        ValueError, match="unsupported vmoe index version '20990101'"
    ):
        read_vmoe_index(prefix)


# === No jax / flax / TensorFlow / Keras ===
def test_reader_imports_no_jax_flax_tensorflow_or_keras():
    script = textwrap.dedent(f"""
        import importlib.util, sys
        BLOCKED = {{"jax", "jaxlib", "flax", "tensorflow", "keras",
                    "keras_vmoe", "torch"}}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked: " + name)
                return None

        for name in list(sys.modules):
            if name.split(".")[0] in BLOCKED:
                del sys.modules[name]
        sys.meta_path.insert(0, Block())
        spec = importlib.util.spec_from_file_location(
            "vmoe_format_standalone", {MODULE_FILE!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        arrays = module.read_vmoe_checkpoint({FIXTURE!r})
        loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print(len(arrays))
        """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(os.path.dirname(ROOT)),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(_params()))


def test_reader_never_unpickles_or_executes():
    with open(MODULE_FILE, encoding="utf-8") as file:
        tree = ast.parse(file.read())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (
            node.names
            if isinstance(node, ast.Import)
            else [ast.alias(node.module or "")]
        )
    }
    assert imported <= {
        "collections",
        "dataclasses",
        "math",
        "os",
        "struct",
        "ml_dtypes",
        "msgpack",
        "numpy",
    }, imported
    called = {
        node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, (ast.Attribute, ast.Name))
    }
    assert not called & {"eval", "exec", "load", "loads", "compile"}, called


# === Downloads from a local server ===
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        range_header = self.headers.get("Range")
        if range_header and not server.ignore_range:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}"
            )
        if server.goog_md5 is not None:
            digest = hashlib.md5(
                body if server.goog_md5 == "right" else b"other"
            ).digest()
            md5 = base64.b64encode(digest).decode()
            self.send_header("x-goog-hash", f"crc32c=n03x6A==,md5={md5}")
        self.end_headers()
        if server.cut_after is not None:
            self.wfile.write(payload[: server.cut_after])
            self.wfile.flush()
            server.cut_after = None  # once
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests = {}, []
    httpd.cut_after, httpd.goog_md5, httpd.ignore_range = None, None, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


BODY = bytes(range(256)) * 40  # 10240 bytes


def test_download_resumes_after_a_cut(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.cut_after, server.goog_md5 = 3000, "right"
    path = str(tmp_path / "cache" / "f.bin")
    url = server.url + "/f.bin"
    with pytest.raises(ConnectionError) as error:
        download_file(url, path, progress=False, timeout=10)
    message = str(error.value)
    assert repr(url) in message and repr(path + ".part") in message
    assert "resumes" in message and f"put it at {path!r}" in message
    assert not os.path.exists(path)
    assert os.path.getsize(path + ".part") == 3000
    assert download_file(url, path, progress=False, timeout=10) == path
    assert server.requests[-1] == ("/f.bin", "bytes=3000-")
    with open(path, "rb") as file:
        assert file.read() == BODY
    assert not os.path.exists(path + ".part")


def test_download_restarts_when_the_range_is_ignored(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.ignore_range = True
    path = str(tmp_path / "f.bin")
    with open(path + ".part", "wb") as file:
        file.write(b"garbage!")
    download_file(
        server.url + "/f.bin", path, expected_size=len(BODY), progress=False
    )
    assert server.requests[-1] == ("/f.bin", "bytes=8-")
    with open(path, "rb") as file:
        assert file.read() == BODY


def test_download_of_a_complete_part_verifies_it(server, tmp_path):
    server.files["/f.bin"] = BODY
    path = str(tmp_path / "f.bin")
    with open(path + ".part", "wb") as file:
        file.write(BODY)
    download_file(server.url + "/f.bin", path, progress=False)  # 416
    with open(path, "rb") as file:
        assert file.read() == BODY


@pytest.mark.parametrize("check", ["md5", "sha256", "size"])
def test_download_refuses_a_bad_file(server, tmp_path, check):
    server.files["/f.bin"] = BODY
    kwargs = {}
    if check == "md5":
        server.goog_md5 = "wrong"
        wanted = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    elif check == "sha256":
        wanted = kwargs["expected_sha256"] = "ab" * 32
    else:
        wanted = kwargs["expected_size"] = len(BODY) + 1
    path = str(tmp_path / "f.bin")
    url = server.url + "/f.bin"
    with pytest.raises(ValueError) as error:
        download_file(url, path, progress=False, **kwargs)
    message = str(error.value)
    assert repr(url) in message and repr(path) in message
    assert str(wanted) in message
    if check != "size":
        actual = hashlib.md5(BODY) if check == "md5" else hashlib.sha256(BODY)
        actual = (
            base64.b64encode(actual.digest()).decode()
            if check == "md5"
            else actual.hexdigest()
        )
        assert actual in message
    assert not os.path.exists(path) and not os.path.exists(path + ".part")


def test_download_reuses_the_cache_without_requests(server, tmp_path, capsys):
    server.files["/f.bin"] = BODY
    server.goog_md5 = "right"
    path = str(tmp_path / "f.bin")
    url = server.url + "/f.bin"
    sha256 = hashlib.sha256(BODY).hexdigest()
    download_file(url, path, expected_size=len(BODY), expected_sha256=sha256)
    assert re.search(
        r"downloading f.bin: [0-9.]+/[0-9.]+ MB\n", capsys.readouterr().err
    )
    count = len(server.requests)
    assert (
        download_file(
            url, path, expected_size=len(BODY), expected_sha256=sha256
        )
        == path
    )
    assert download_file(url, path) == path
    assert len(server.requests) == count == 1


def test_download_errors_name_the_url_and_path(server, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    path = str(tmp_path / "x")
    with pytest.raises(ConnectionError) as error:
        download_file(url, path, progress=False, timeout=5)
    assert repr(url) in str(error.value) and repr(path) in str(error.value)
    assert f"download {url} yourself" in str(error.value)
    with pytest.raises(ValueError, match="HTTP 404") as error:
        download_file(server.url + "/missing", path, progress=False)
    assert "/missing" in str(error.value) and repr(path) in str(error.value)
    assert not os.path.exists(path)


def test_download_vmoe_checkpoint(server, tmp_path, monkeypatch):
    tree = _tree(np.random.default_rng(1))
    source = tmp_path / "remote"
    source.mkdir()
    vmoe_writer.write_vmoe_checkpoint(
        str(source / "vmoe_tiny"), tree, num_shards=3, chunks_per_array=2
    )
    for name in os.listdir(source):
        server.files[f"/bucket/{name}"] = (source / name).read_bytes()
    monkeypatch.setenv("KERAS_VMOE_CACHE", str(tmp_path / "cache"))
    prefix = download_vmoe_checkpoint(
        server.url + "/bucket/", "vmoe_tiny", progress=False
    )
    assert prefix == str(tmp_path / "cache" / "vmoe_tiny")
    assert [r[0] for r in server.requests] == [
        "/bucket/vmoe_tiny.index",
        "/bucket/vmoe_tiny.data-00000-of-00003",
        "/bucket/vmoe_tiny.data-00001-of-00003",
        "/bucket/vmoe_tiny.data-00002-of-00003",
    ]
    _assert_same(read_vmoe_checkpoint(prefix), tree)
    assert (
        download_vmoe_checkpoint(
            server.url + "/bucket", "vmoe_tiny", progress=False
        )
        == prefix
    )
    assert len(server.requests) == 4
    with pytest.raises(ValueError, match="relative name"):
        download_vmoe_checkpoint(
            server.url, "../escape", cache_dir=str(tmp_path)
        )
