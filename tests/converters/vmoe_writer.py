"""A small, independent writer of vmoe's partitioned msgpack checkpoints.

For tests of `keras_vmoe.converters.vmoe_format` only; written from the
format description (msgpack + numpy + ml_dtypes): `<prefix>.index` plus
`<prefix>.data-NNNNN-of-MMMMM` shards, arrays as msgpack extension types.

Array number i is the i-th leaf of a depth-first walk of `tree` in the
order of its dict keys, and the index is written in that same order.
"""

import math

import msgpack
import numpy as np

SHARD_MAGIC = "__msgpack_array_chunk_a87ca2__"
FLAX_CHUNKED = "__msgpack_chunked_array__"


def _pack(value):
    return msgpack.packb(value, use_bin_type=True)


def ndarray_payload(array, shape=None, dtype_name=None):
    """The ext-1 payload of `array` (`shape` / `dtype_name` may lie)."""
    array = np.ascontiguousarray(array)
    return _pack(
        (
            tuple(array.shape if shape is None else shape),
            array.dtype.name if dtype_name is None else dtype_name,
            array.tobytes(),
        )
    )


def encode_ndarray(array, shape=None, dtype_name=None):
    return msgpack.ExtType(1, ndarray_payload(array, shape, dtype_name))


def slice_payload(start, stop, step=None):
    return _pack((start, stop, step))


def slice_nd_payload(bounds):
    """`bounds`: a tuple of (start, stop), one per axis."""
    return _pack(tuple(slice_payload(a, b) for a, b in bounds))


def encode_slice_nd(bounds):
    return msgpack.ExtType(6, slice_nd_payload(bounds))


def encode_index_info(shape, dtype_name, slices, shards, named_shape=None):
    shaped = _pack((tuple(shape), dtype_name, False, named_shape or {}))
    payload = _pack(
        (shaped, tuple(slice_nd_payload(s) for s in slices), tuple(shards))
    )
    return msgpack.ExtType(8, payload)


def flatten(tree, prefix=()):
    """[(keys, array)] depth-first in the dict's own key order."""
    leaves = []
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.extend(flatten(value, prefix + (key,)))
        else:
            leaves.append((prefix + (key,), np.asarray(value)))
    return leaves


def _split(shape, parts):
    """Chunk bounds along axis 0 (one chunk for a scalar)."""
    if not shape:
        return [()]
    parts = max(1, min(parts, shape[0]))
    edges = np.linspace(0, shape[0], parts + 1).round().astype(int)
    rest = tuple((0, n) for n in shape[1:])
    return [((int(a), int(b)),) + rest for a, b in zip(edges, edges[1:])]


def _set(tree, keys, value):
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def write_vmoe_checkpoint(
    prefix,
    tree,
    num_shards=1,
    chunks_per_array=1,
    version="20220622",
    subchunk_items=None,
    flax_chunked=False,
):
    """Writes `tree` (a nested dict of numpy arrays) as a vmoe checkpoint.

    Args:
        prefix: the output prefix.
        tree: nested dicts of arrays (use keys '0', '1', ... for lists).
        num_shards: number of data shards.
        chunks_per_array: split each array along axis 0 into this many
            chunks (at most its length); chunk j of array i goes to shard
            (i + j) % num_shards.
        version: the index version string, or None for the old format.
        subchunk_items: split each flat chunk into subchunks of at most this
            many values (None: one subchunk).
        flax_chunked: write each subchunk in flax's own chunked-array form.

    Returns:
        The list of shard file paths.
    """
    leaves = flatten(tree)
    index = {}
    shards = [{SHARD_MAGIC: True} for _ in range(num_shards)]
    for i, (keys, array) in enumerate(leaves):
        bounds = _split(array.shape, chunks_per_array)
        holders = [(i + j) % num_shards for j in range(len(bounds))]
        _set(
            index,
            keys,
            encode_index_info(array.shape, array.dtype.name, bounds, holders),
        )
        for bound, shard in zip(bounds, holders):
            chunk = array[tuple(slice(a, b) for a, b in bound)].reshape(-1)
            step = subchunk_items or max(chunk.size, 1)
            pieces = [chunk[k : k + step] for k in range(0, chunk.size, step)]
            subchunks = [_subchunk(p, flax_chunked) for p in pieces]
            shards[shard].setdefault(str(i), []).append(
                [subchunks, encode_slice_nd(bound)]
            )
    content = {"shard_count": num_shards, "index": index}
    if version is not None:
        content["version"] = version
    with open(prefix + ".index", "wb") as file:
        file.write(_pack(content))
    paths = []
    for n, shard in enumerate(shards):
        path = f"{prefix}.data-{n:05d}-of-{num_shards:05d}"
        with open(path, "wb") as file:
            file.write(_pack(shard))
        paths.append(path)
    return paths


def _subchunk(piece, flax_chunked):
    if not flax_chunked:
        return encode_ndarray(piece)
    half = max(1, math.ceil(piece.size / 2))
    parts = [piece[k : k + half] for k in range(0, piece.size, half)]
    return {
        FLAX_CHUNKED: True,
        "shape": {str(k): n for k, n in enumerate(piece.shape)},
        "chunks": {str(k): encode_ndarray(p) for k, p in enumerate(parts)},
    }


def read_raw(path):
    """A file's msgpack content with extension types left as `ExtType`."""
    with open(path, "rb") as file:
        return msgpack.unpackb(
            file.read(), raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d)
        )


def write_raw(path, content):
    with open(path, "wb") as file:
        file.write(_pack(content))
