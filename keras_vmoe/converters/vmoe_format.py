"""Reads google-research/vmoe's published (partitioned msgpack) checkpoints.

A vmoe checkpoint is an index file `<prefix>.index` plus data shards
`<prefix>.data-NNNNN-of-MMMMM` (shard number, then shard count, both zero
padded to 5 digits: `x.data-00000-of-00002`). Each file is one msgpack
blob; numpy arrays and vmoe's own types are msgpack extension types whose
payloads are themselves msgpack (packed with `use_bin_type=True`):

- 1 ndarray, 3 numpy scalar: `(shape, dtype name, C-order buffer)`;
  `bfloat16` and the float8 / int4 types come from `ml_dtypes`;
- 2 complex: `(real, imag)`;
- 4 ShapedArray: `(shape, dtype name, weak_type, named_shape)`;
- 5 Slice: `(start, stop, step)`; 6 SliceNd: a tuple of Slice payloads;
  7 SliceNdArray: `(shape, tuple of SliceNd payloads)`;
- 8 IndexInfo: `(ShapedArray payload, tuple of SliceNd payloads (the
  global slice of each chunk), tuple of ints (the shard of each chunk))`.

The index holds `{'shard_count': int, 'index': tree, 'version': '20220622'}`
(checkpoints written before mid-2022 have no `'version'`: version `None`).
The tree is a nested dict (lists appear as dicts keyed '0', '1', ...)
whose leaves are IndexInfo. A data shard holds
`{'__msgpack_array_chunk_a87ca2__': True, str(i): [[subchunks, slice], ...]}`
where the flat chunk is the concatenation of the 1-D `subchunks`, reshaped
to the extents of its global `slice`.

Leaf-order rule: array number `i` is the i-th IndexInfo leaf of a
depth-first walk of the index tree in the order its keys appear in the
file (msgpack keeps it; it is NOT sorted): vmoe numbered the leaves in the
order it serialized them. The reader checks the rule: every chunk found in
a shard must be one the index lists for that array, in that shard, with
its shape equal to its slice's extents, and the index's chunks must tile
each array exactly (no gap, no overlap).

This module imports only the standard library, numpy, msgpack and
ml_dtypes (no jax, flax, TensorFlow or Keras, nor anything of keras_vmoe):
it can be loaded on its own by file path. Reading never unpickles or
executes anything from the files.
"""

import collections
import dataclasses
import math
import os
import struct

import ml_dtypes
import msgpack
import numpy as np

# The index version vmoe writes since mid-2022 (`vmoe.checkpoints.partitioned`).
VERSION_V1 = "20220622"
_SUPPORTED_VERSIONS = (None, VERSION_V1)

_SHARD_MAGIC = "__msgpack_array_chunk_a87ca2__"
_FLAX_CHUNKED = "__msgpack_chunked_array__"
_LFS_POINTER = b"version https://git-lfs"

# Non-numpy dtypes vmoe / flax may name (`x.dtype.name` of a jax array).
_ML_DTYPE_NAMES = (
    "bfloat16",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3b11fnuz",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float4_e2m1fn",
    "int2",
    "int4",
    "uint2",
    "uint4",
)

# What msgpack, numpy and the payload checks raise for a damaged file.
_DECODE_ERRORS = (
    msgpack.exceptions.UnpackException,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,
    struct.error,
)


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """One array of a vmoe checkpoint, as its index describes it.

    Attributes:
        shape: the global shape, a tuple of ints (`()` for a scalar).
        dtype: the stored `np.dtype` (`ml_dtypes.bfloat16` for bfloat16).
        slices: one global slice per chunk, each a tuple (one per axis) of
            `(start, stop)` pairs.
        shards: the shard number holding each chunk.
    """

    shape: tuple
    dtype: np.dtype
    slices: list
    shards: list


@dataclasses.dataclass
class VmoeIndex:
    """The content of a vmoe `<prefix>.index` file.

    Attributes:
        prefix: the checkpoint prefix (without `.index`).
        version: the index version string (`"20220622"`), or None for the
            format written before mid-2022.
        shard_count: the number of data shards.
        entries: `{path: IndexEntry}` in array-number order, paths joined
            with "/" (e.g. "Encoder/encoderblock_0/Mlp/Dense_0/kernel").
    """

    prefix: str
    version: object
    shard_count: int
    entries: dict

    @property
    def index_path(self):
        return self.prefix + ".index"

    def shard_paths(self):
        """The data shard files, `<prefix>.data-NNNNN-of-MMMMM`, in order."""
        return [
            _shard_path(self.prefix, shard, self.shard_count)
            for shard in range(self.shard_count)
        ]


def read_vmoe_index(prefix):
    """Reads and checks the index of a vmoe checkpoint.

    Args:
        prefix: the checkpoint prefix, e.g. "ckpt/vmoe_b16" for
            "ckpt/vmoe_b16.index" (a trailing ".index" is accepted).

    Returns:
        A `VmoeIndex`.

    Raises:
        ValueError: naming the file, for a missing index, a Git LFS
            pointer, a truncated or corrupt file, an unsupported version,
            and (naming the parameter and its shape) for chunk slices or
            shard numbers that do not tile the array exactly.
    """
    prefix = _normalize_prefix(prefix)
    path = prefix + ".index"
    if not os.path.isfile(path):
        raise ValueError(
            f"vmoe checkpoint index not found: {path!r} (a checkpoint is "
            "`<prefix>.index` plus `<prefix>.data-NNNNN-of-MMMMM` shards). "
            f"Received: prefix={prefix!r}"
        )
    content = _read_msgpack_file(path)
    try:
        return _parse_index(prefix, content)
    except _FormatError as error:
        raise ValueError(f"{path!r}: {error}") from None


def read_vmoe_checkpoint(prefix, keys=None):
    """Reads the arrays of a vmoe checkpoint into a flat dict.

    Each needed shard is read once; chunks are checked against the index
    (see the module docstring) and assembled into global arrays.

    Args:
        prefix: the checkpoint prefix (a trailing ".index" is accepted).
        keys: None for every array, or the "/"-joined paths to read (only
            the shards holding them are read).

    Returns:
        `{path: np.ndarray}` in index order, each array in its stored dtype
        (`ml_dtypes.bfloat16` for bfloat16).

    Raises:
        ValueError: naming the file(s) (and the parameter path and shapes
            where relevant), for a missing index or shard, a Git LFS pointer,
            a truncated or corrupt file, an unknown msgpack extension or
            dtype, a buffer whose size does not match its shape and dtype,
            or a shard whose chunks disagree with the index; and for
            unknown `keys`.
    """
    index = read_vmoe_index(prefix)
    paths = list(index.entries)
    entries = list(index.entries.values())
    if keys is None:
        wanted = range(len(paths))
    else:
        if isinstance(keys, str):
            keys = [keys]
        number = {path: i for i, path in enumerate(paths)}
        unknown = [key for key in keys if key not in number]
        if unknown:
            raise ValueError(
                f"{index.index_path!r} has no parameter(s) {unknown}. "
                f"It has {len(paths)}, e.g. {paths[:5]}."
            )
        wanted = sorted({number[key] for key in keys})
    wanted = set(wanted)

    # The chunks each shard must hold: {shard: {(array number, slice)}}.
    expected = collections.defaultdict(dict)
    for i, entry in enumerate(entries):
        for global_slice, shard in zip(entry.slices, entry.shards):
            expected[shard][(i, global_slice)] = False
    outputs = {i: np.empty(entries[i].shape, entries[i].dtype) for i in wanted}
    shards = sorted({s for i in wanted for s in entries[i].shards})
    for shard in shards:
        path = _shard_path(index.prefix, shard, index.shard_count)
        if not os.path.isfile(path):
            first, last = index.shard_paths()[0], index.shard_paths()[-1]
            raise ValueError(
                f"Missing vmoe checkpoint shard {path!r}: the index "
                f"{index.index_path!r} expects {index.shard_count} shard(s), "
                f"{first!r} to {last!r}."
            )
        content = _read_msgpack_file(path)
        try:
            _fill_from_shard(
                content, shard, expected[shard], paths, entries, outputs
            )
        except _FormatError as error:
            raise ValueError(
                f"{path!r} (index {index.index_path!r}): {error}"
            ) from None
        del content
        missing = [key for key, found in expected[shard].items() if not found]
        if missing:
            i, global_slice = missing[0]
            raise ValueError(
                f"{path!r} lacks {len(missing)} chunk(s) that the index "
                f"{index.index_path!r} places in it, e.g. parameter "
                f"{paths[i]!r} (shape {entries[i].shape}) at slice "
                f"{_format_slice(global_slice)}."
            )
    return {paths[i]: outputs[i] for i in sorted(wanted)}


# === Files ===
class _FormatError(ValueError):
    """A well-formed msgpack file whose content breaks the vmoe format."""


def _normalize_prefix(prefix):
    try:
        prefix = os.fspath(prefix)
    except TypeError:
        raise TypeError(
            "`prefix` must be the path prefix of a vmoe checkpoint. "
            f"Received: prefix={prefix!r}"
        ) from None
    if prefix.endswith(".index"):
        prefix = prefix[: -len(".index")]
    return prefix


def _shard_path(prefix, shard, shard_count):
    return f"{prefix}.data-{shard:05d}-of-{shard_count:05d}"


def _read_msgpack_file(path):
    """Reads one msgpack blob, naming `path` in any error."""
    with open(path, "rb") as file:
        data = file.read()
    if data.startswith(_LFS_POINTER):
        raise ValueError(
            f"{path!r} is a Git LFS pointer, not the checkpoint file: run "
            "`git lfs pull` (or download the file) first."
        )
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False)
    except _FormatError as error:
        raise ValueError(f"{path!r}: {error}") from None
    except _DECODE_ERRORS as error:
        raise ValueError(
            f"{path!r} is not a readable vmoe checkpoint file (truncated or "
            f"corrupt?): {type(error).__name__}: {error}"
        ) from None


# === Extension types ===
_Slice = collections.namedtuple("_Slice", ["start", "stop", "step"])
_ShapedArray = collections.namedtuple("_ShapedArray", ["shape", "dtype"])
_IndexInfo = collections.namedtuple(
    "_IndexInfo", ["shape", "dtype", "slices", "shards"]
)
_SliceNdArray = collections.namedtuple("_SliceNdArray", ["shape", "slices"])


class _SliceNd(tuple):
    """A tuple of `_Slice`, one per axis."""


def _ext_hook(code, data):
    if code == 1:
        return _decode_ndarray(data)
    if code == 2:
        real, imag = _unpack_payload(data, 2, "complex")
        return complex(real, imag)
    if code == 3:
        return _decode_ndarray(data).reshape(())
    if code == 4:
        return _decode_shaped_array(data)
    if code == 5:
        return _decode_slice(data)
    if code == 6:
        return _decode_slice_nd(data)
    if code == 7:
        shape, slices = _unpack_payload(data, 2, "SliceNdArray")
        return _SliceNdArray(
            _shape(shape), [_decode_slice_nd(s) for s in slices]
        )
    if code == 8:
        shaped, slices, shards = _unpack_payload(data, 3, "IndexInfo")
        shaped = _decode_shaped_array(shaped)
        return _IndexInfo(
            shaped.shape,
            shaped.dtype,
            [_decode_slice_nd(s) for s in slices],
            list(shards),
        )
    raise _FormatError(
        f"unknown msgpack extension type {code} (a vmoe checkpoint uses 1 "
        "to 8)"
    )


def _unpack_payload(data, length, what):
    value = msgpack.unpackb(data, raw=True)
    if not isinstance(value, (list, tuple)) or len(value) < length:
        raise _FormatError(f"a corrupt {what} payload: {value!r:.200}")
    return value[:length]


def _shape(shape):
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise _FormatError(f"a corrupt array shape: {shape!r:.200}")
    return tuple(shape)


def _dtype_from_name(name):
    if isinstance(name, bytes):
        name = name.decode("ascii", errors="replace")
    if not isinstance(name, str):
        raise _FormatError(f"a corrupt dtype name: {name!r:.200}")
    if name in _ML_DTYPE_NAMES and hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biufc":
        raise _FormatError(f"unknown dtype name {name!r}")
    return dtype


def _decode_ndarray(data):
    shape, dtype_name, buffer = _unpack_payload(data, 3, "ndarray")
    shape = _shape(shape)
    dtype = _dtype_from_name(dtype_name)
    if not isinstance(buffer, bytes):
        raise _FormatError(f"a corrupt ndarray buffer: {buffer!r:.200}")
    needed = math.prod(shape) * dtype.itemsize
    if len(buffer) != needed:
        raise _FormatError(
            f"an array of shape {shape} and dtype {dtype.name} needs "
            f"{needed} bytes, but its buffer holds {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _decode_shaped_array(data):
    # Old vmoe versions also stored a (possibly non-empty) named_shape.
    shape, dtype_name = _unpack_payload(data, 2, "ShapedArray")
    return _ShapedArray(_shape(shape), _dtype_from_name(dtype_name))


def _decode_slice(data):
    start, stop, step = _unpack_payload(data, 3, "Slice")
    for value in (start, stop, step):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool)
        ):
            raise _FormatError(f"a corrupt Slice: {(start, stop, step)!r}")
    return _Slice(start, stop, step)


def _decode_slice_nd(data):
    slices = msgpack.unpackb(data, raw=True)
    if not isinstance(slices, (list, tuple)):
        raise _FormatError(f"a corrupt SliceNd payload: {slices!r:.200}")
    return _SliceNd(_decode_slice(s) for s in slices)


# === Index ===
def _parse_index(prefix, content):
    if not isinstance(content, dict) or "index" not in content:
        raise _FormatError(
            "not a vmoe checkpoint index (expected a dict with 'shard_count' "
            f"and 'index'; found {_describe(content)})"
        )
    version = content.get("version")
    if version not in _SUPPORTED_VERSIONS:
        raise _FormatError(
            f"unsupported vmoe index version {version!r} (supported: "
            f"{VERSION_V1!r} and the older format without a version)"
        )
    shard_count = content.get("shard_count")
    if (
        not isinstance(shard_count, int)
        or isinstance(shard_count, bool)
        or shard_count < 1
    ):
        raise _FormatError(f"a corrupt shard_count: {shard_count!r}")
    leaves = []
    _walk_index(content["index"], "", leaves)
    entries = {}
    for path, info in leaves:
        entries[path] = _make_entry(path, info, shard_count)
    return VmoeIndex(prefix, version, shard_count, entries)


def _walk_index(tree, prefix, leaves):
    """Depth-first, in the order of the file's keys (never sorted)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), value) for i, value in enumerate(tree))
    else:
        raise _FormatError(
            f"the index tree at {prefix or '<root>'!r} is "
            f"{_describe(tree)}, not a dict"
        )
    for key, value in items:
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, _IndexInfo):
            leaves.append((path, value))
        elif isinstance(value, (dict, list)):
            _walk_index(value, path, leaves)
        elif value is not None:
            raise _FormatError(
                f"the index leaf {path!r} is {_describe(value)}, not an "
                "IndexInfo"
            )


def _make_entry(path, info, shard_count):
    shape = info.shape
    where = f"parameter {path!r} (shape {shape})"
    if len(info.slices) != len(info.shards) or not info.slices:
        raise _FormatError(
            f"{where} lists {len(info.slices)} chunk slice(s) but "
            f"{len(info.shards)} shard number(s)"
        )
    for shard in info.shards:
        if not isinstance(shard, int) or not 0 <= shard < shard_count:
            raise _FormatError(
                f"{where} places a chunk in shard {shard!r}, but there are "
                f"{shard_count} shard(s)"
            )
    slices = [_slice_bounds(s, shape, where) for s in info.slices]
    _check_tiling(slices, shape, where)
    return IndexEntry(shape, info.dtype, slices, list(info.shards))


def _slice_bounds(slice_nd, shape, where):
    """A SliceNd as a tuple of (start, stop), checked against `shape`."""
    if not isinstance(slice_nd, _SliceNd) or len(slice_nd) != len(shape):
        raise _FormatError(
            f"{where} has a chunk slice {_describe(slice_nd)} that is not "
            f"{len(shape)}-dimensional"
        )
    bounds = []
    for s, size in zip(slice_nd, shape):
        start = 0 if s.start is None else s.start
        stop = size if s.stop is None else s.stop
        if s.step not in (None, 1) or not 0 <= start <= stop <= size:
            raise _FormatError(
                f"{where} has a chunk slice {tuple(slice_nd)} outside the "
                "array or with a step"
            )
        bounds.append((start, stop))
    return tuple(bounds)


def _check_tiling(slices, shape, where):
    """The slices cover every element exactly once (no gap, no overlap)."""
    volume = sum(math.prod(b - a for a, b in s) for s in slices)
    if len(slices) > 1:
        bounds = np.asarray(slices, dtype=np.int64).reshape(
            len(slices), len(shape), 2
        )
        starts, stops = bounds[..., 0], bounds[..., 1]
        overlap = np.all(
            np.maximum(starts[:, None], starts[None, :])
            < np.minimum(stops[:, None], stops[None, :]),
            axis=-1,
        )
        np.fill_diagonal(overlap, False)
        if overlap.any():
            i, j = np.argwhere(overlap)[0]
            raise _FormatError(
                f"{where} has overlapping chunk slices "
                f"{_format_slice(slices[i])} and {_format_slice(slices[j])}"
            )
    if volume != math.prod(shape):
        raise _FormatError(
            f"{where}: its chunk slices cover {volume} of its "
            f"{math.prod(shape)} elements (a gap): "
            f"{[_format_slice(s) for s in slices]}"
        )


# === Shards ===
def _fill_from_shard(content, shard, expected, paths, entries, outputs):
    """Checks one shard's chunks against the index; copies wanted ones."""
    if not isinstance(content, dict) or content.get(_SHARD_MAGIC) is not True:
        raise _FormatError(
            f"not a vmoe checkpoint data shard (no {_SHARD_MAGIC!r} key; "
            f"found {_describe(content)})"
        )
    for key, chunks in content.items():
        if key == _SHARD_MAGIC:
            continue
        if not (isinstance(key, str) and key.isdigit()):
            raise _FormatError(f"a corrupt array number {key!r}")
        i = int(key)
        if i >= len(paths):
            raise _FormatError(
                f"holds array number {i}, but the index lists only "
                f"{len(paths)} arrays"
            )
        entry = entries[i]
        where = f"parameter {paths[i]!r} (array {i}, shape {entry.shape})"
        if not isinstance(chunks, list):
            raise _FormatError(f"{where}: corrupt chunk list")
        for pair in chunks:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _FormatError(f"{where}: corrupt chunk {pair!r:.200}")
            subchunks, slice_nd = pair
            global_slice = _slice_bounds(slice_nd, entry.shape, where)
            found = expected.get((i, global_slice))
            if found is None:
                listed = [
                    f"{_format_slice(s)} in shard {n}"
                    for s, n in zip(entry.slices, entry.shards)
                ]
                raise _FormatError(
                    f"{where} has a chunk at slice "
                    f"{_format_slice(global_slice)} in shard {shard}, which "
                    f"the index does not list (it lists {listed}); the "
                    "index and the shards disagree"
                )
            if found:
                raise _FormatError(
                    f"{where} has two chunks at slice "
                    f"{_format_slice(global_slice)}"
                )
            expected[(i, global_slice)] = True
            chunk = _concatenate(subchunks, entry, global_slice, where)
            if i in outputs:
                outputs[i][tuple(slice(a, b) for a, b in global_slice)] = chunk


def _concatenate(subchunks, entry, global_slice, where):
    extents = tuple(b - a for a, b in global_slice)
    if not isinstance(subchunks, list):
        raise _FormatError(f"{where}: corrupt subchunks {subchunks!r:.200}")
    pieces = [_flat_piece(piece, where) for piece in subchunks]
    for piece in pieces:
        if piece.dtype != entry.dtype:
            raise _FormatError(
                f"{where}: a chunk holds {piece.dtype.name} values, the "
                f"index says {entry.dtype.name}"
            )
    size = sum(piece.size for piece in pieces)
    if size != math.prod(extents):
        raise _FormatError(
            f"{where}: the chunk at slice {_format_slice(global_slice)} "
            f"holds {size} values, its slice needs shape {extents} "
            f"({math.prod(extents)} values)"
        )
    if not pieces:
        return np.empty(extents, entry.dtype)
    return np.concatenate(pieces).reshape(extents)


def _flat_piece(piece, where):
    """A subchunk as a 1-D array (also flax's own chunked-array form)."""
    if isinstance(piece, dict) and piece.get(_FLAX_CHUNKED):
        try:
            shape = _shape(_dict_values(piece["shape"]))
            chunks = _dict_values(piece["chunks"])
        except (KeyError, TypeError):
            raise _FormatError(
                f"{where}: a corrupt {_FLAX_CHUNKED!r} array"
            ) from None
        flat = [_flat_piece(chunk, where) for chunk in chunks]
        size = sum(p.size for p in flat)
        if size != math.prod(shape) or not flat:
            raise _FormatError(
                f"{where}: a {_FLAX_CHUNKED!r} array of shape {shape} holds "
                f"{size} values"
            )
        return np.concatenate(flat)
    if not isinstance(piece, np.ndarray):
        raise _FormatError(
            f"{where}: a subchunk is {_describe(piece)}, not an array"
        )
    return piece.reshape(-1)


def _dict_values(mapping):
    """flax's tuple-as-dict: {'0': a, '1': b, ...} -> [a, b, ...]."""
    return [mapping[str(i)] for i in range(len(mapping))]


def _format_slice(bounds):
    return "[" + ", ".join(f"{a}:{b}" for a, b in bounds) + "]"


def _describe(value):
    if isinstance(value, dict):
        return f"a dict with keys {list(value)[:8]}"
    return f"a {type(value).__name__}"
