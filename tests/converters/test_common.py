"""WeightAssigner and checkpoint reading: coverage, shapes, no pickle."""

import keras
import numpy as np
import pytest

from keras_vmoe.converters import WeightAssigner
from keras_vmoe.converters import load_state_dict
from keras_vmoe.layers import MoEFeedForward


def _dense():
    layer = keras.layers.Dense(3, name="fc")
    layer.build((None, 2))
    return layer


def _source():
    return {"fc.weight": np.ones((3, 2)), "fc.bias": np.full((3,), 2.0)}


def _convert(layer, source):
    assigner = WeightAssigner(source, layer.weights)
    assigner.assign(layer.kernel, "fc.weight", np.transpose)
    assigner.assign(layer.bias, "fc.bias")
    assigner.finish()


def test_assigns_by_name_and_transform():
    layer = _dense()
    _convert(layer, _source())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), 1.0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.bias), 2.0)


def test_missing_key_is_named():
    source = _source()
    del source["fc.bias"]
    with pytest.raises(ValueError, match="no tensor 'fc.bias'.*fc.weight"):
        _convert(_dense(), source)


def test_wrong_shape_names_key_and_shapes():
    source = _source()
    source["fc.bias"] = np.zeros((4,))
    with pytest.raises(ValueError, match=r"'fc.bias'.*\(4,\).*\(3,\)"):
        _convert(_dense(), source)


def test_extra_source_key_is_reported():
    source = dict(_source(), **{"fc.extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"1 source tensors were not used: \['fc.extra'\]"):
        _convert(_dense(), source)


def test_unset_variable_is_reported():
    layer = _dense()
    assigner = WeightAssigner(_source(), layer.weights)
    assigner.assign(layer.kernel, "fc.weight", np.transpose)
    assigner.skip("fc.bias")
    with pytest.raises(ValueError, match="1 variables were not set.*bias"):
        assigner.finish()


def test_routing_statistics_are_not_conversion_targets():
    moe = MoEFeedForward(2, 4)
    moe.build((None, 3, 5))
    assigner = WeightAssigner({}, moe.weights)
    paths = {v.path for v in assigner.targets.values()}
    assert moe.expert_load.path not in paths
    assert moe.expert_kernel_1.path in paths


def test_reads_safetensors_and_npz(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"a": np.arange(3, dtype="float32")}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **tensors)
    for name in ("w.safetensors", "w.npz"):
        loaded = load_state_dict(tmp_path / name)
        np.testing.assert_array_equal(loaded["a"], tensors["a"])


def test_refuses_pickled_checkpoints(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickled PyTorch checkpoints are refused"):
        load_state_dict(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="not found.*nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")
