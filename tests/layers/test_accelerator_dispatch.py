"""Which path `dispatch="auto"` takes on a GPU, and `layer.dispatch_path`.

The accelerator rules are checked on a CPU by telling the dispatcher it
runs on a GPU (`backends.accelerator`) and whether the grouped matmul is
a grouped GEMM kernel there (`backends.grouped_matmul_is_fast`): the path
it then picks runs here too, and must give the slot path's outputs.
"""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import ExpertChoiceFeedForward
from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import SoftMoEFeedForward
from keras_vmoe.layers import backends
from keras_vmoe.layers import dispatch

BACKEND = keras.backend.backend()
GROUPED = BACKEND in ("jax", "torch")
TOKENS = np.random.default_rng(5).standard_normal((4, 9, 16)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


# === resolve_dispatch on an accelerator ===
@pytest.mark.parametrize("accelerator", ["gpu", "tpu"])
def test_auto_on_an_accelerator_is_grouped_where_fast_else_slots(accelerator):
    assert dispatch.resolve_dispatch(
        "auto", accelerator=accelerator, grouped_fast=True
    ) == "grouped"
    assert dispatch.resolve_dispatch(
        "auto", accelerator=accelerator, grouped_fast=False
    ) == "slots"


def test_auto_on_a_gpu_never_takes_the_tile_loop():
    # On a CPU under XLA this layout takes the sorted (tile) path.
    layout = dispatch.StaticLayout.of((1, 4096, 1, 64), 1, 4096, 8)
    with _in_xla():
        assert dispatch.resolve_dispatch(
            "auto", layout=layout, accelerator="cpu"
        ) == "sorted"
        assert dispatch.resolve_dispatch(
            "auto", layout=layout, accelerator="gpu"
        ) == "slots"


@pytest.mark.parametrize("xla", [True, False])
def test_dropless_tokens_on_a_gpu_never_take_slots_for_every_token(xla):
    # Without a grouped kernel, slots would give every expert every token.
    layout = dispatch.StaticLayout.of((1, 512, 1, 64), 2, None, 8)
    with _in_xla(xla):
        for fast, path in ((False, "sorted"), (True, "grouped")):
            assert dispatch.resolve_dispatch(
                "auto",
                dropless_tokens=True,
                layout=layout,
                accelerator="gpu",
                grouped_fast=fast,
            ) == path


def test_explicit_paths_and_expert_parallelism_on_a_gpu():
    for name in ("slots", "sorted", "grouped"):
        assert dispatch.resolve_dispatch(name, accelerator="gpu") == name
    assert dispatch.resolve_dispatch(
        "auto", accelerator="gpu", grouped_fast=True, expert_parallel=True
    ) == "slots"


def test_on_a_cpu_nothing_is_fast():
    assert backends.accelerator() == "cpu"
    for dtype in ("float32", "bfloat16", "float16"):
        assert not backends.grouped_matmul_is_fast(dtype, 256, 64, 256, 8)


def test_count_ragged_dots_reads_hlo_text():
    from keras_vmoe.layers.backends import jax as jax_backend

    text = (
        "ENTRY %main {\n"
        "  %r = bf16[256,64]{1,0} ragged-dot(%a, %b, %c), lhs_contracting\n"
        "  %d = bf16[8,256,64]{2,1,0} dot(%a, %b)\n"
        "  %g = bf16[8,64,32]{2,1,0} ragged-dot(%x, %y, %z)\n"
        "}\n"
    )
    assert jax_backend.count_ragged_dots(text) == 2
    assert jax_backend.count_ragged_dots("%d = f32[8,4]{1,0} dot(%a, %b)") == 0


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's ragged dot")
def test_xla_on_a_cpu_rewrites_ragged_dots_to_dense_ones():
    # The check `grouped_matmul_is_fast` runs on a GPU: here it says no.
    from keras_vmoe.layers.backends import jax as jax_backend

    assert not jax_backend._ragged_dots_are_grouped("bfloat16", 64, 16, 32, 4)


# === the layer on a (pretended) GPU ===
def _on_a_gpu(monkeypatch, fast):
    monkeypatch.setattr(backends, "accelerator", lambda: "gpu")
    monkeypatch.setattr(
        backends, "grouped_matmul_is_fast", lambda *args: fast
    )


CASES = {
    "token top-1 cf 1.25": (
        dict(top_k=1, capacity_factor=1.25), "grouped", "slots"
    ),
    "token top-2 dropless": (
        dict(top_k=2, capacity_factor=None, eval_capacity_factor=None),
        "grouped",
        "sorted",
    ),
    "image top-1 dropless": (
        dict(routing="image", capacity_factor=None, eval_capacity_factor=None),
        "grouped",
        "gather",
    ),
    "image top-1 cf 1.0": (
        dict(routing="image", capacity_factor=1.0), "grouped", "slots"
    ),
}


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_on_a_gpu_runs_the_rule_and_matches_slots(monkeypatch, case, fast):
    kwargs, if_fast, otherwise = CASES[case]
    if not GROUPED and if_fast == "grouped":
        if_fast = otherwise  # no grouped matmul: never "fast"
    _on_a_gpu(monkeypatch, fast)
    auto = MoEFeedForward(6, 32, seed=0, **kwargs)
    assert auto.dispatch_path is None
    slots = MoEFeedForward(6, 32, dispatch="slots", seed=0, **kwargs)
    auto(TOKENS)
    slots(TOKENS)
    slots.set_weights(auto.get_weights())
    for training in (True, False):
        np.testing.assert_allclose(
            _np(auto(TOKENS, training=training)),
            _np(slots(TOKENS, training=training)),
            rtol=1e-5,
            atol=1e-5,
        )
        assert auto.dispatch_path == (if_fast if fast else otherwise)


def test_tensorflow_on_a_gpu_runs_slots_whatever_it_is_told(monkeypatch):
    monkeypatch.setattr(backends, "supports_grouped_matmul", lambda: False)
    _on_a_gpu(monkeypatch, True)
    layer = MoEFeedForward(6, 32, seed=0)
    layer(TOKENS)
    assert layer.dispatch_path == "slots"


# === dispatch_path of every layer ===
@pytest.mark.parametrize(
    "path", ["slots", "sorted", "grouped"] if GROUPED else ["slots", "sorted"]
)
def test_dispatch_path_names_the_explicit_path(path):
    layer = MoEFeedForward(6, 32, dispatch=path, seed=0)
    layer(TOKENS, training=True)
    assert layer.dispatch_path == path


def test_dispatch_path_of_soft_moe_and_expert_choice():
    soft = SoftMoEFeedForward(4, 32)
    choice = ExpertChoiceFeedForward(4, 32)
    assert soft.dispatch_path is None and choice.dispatch_path is None
    soft(TOKENS)
    choice(TOKENS)
    assert soft.dispatch_path == "soft"
    assert choice.dispatch_path == "expert_choice"


def test_a_registered_dispatcher_is_named_and_preferred(monkeypatch):
    monkeypatch.setattr(dispatch, "DISPATCHERS", dict(dispatch.DISPATCHERS))
    monkeypatch.setattr(dispatch, "DISPATCH_MODES", dispatch.DISPATCH_MODES)

    class OnGPUs(dispatch.SlotDispatcher):
        @classmethod
        def preferred(cls, context):
            return context.accelerator == "gpu"

    dispatch.register_dispatcher("slots_on_gpus", OnGPUs())
    assert dispatch.DISPATCHERS["slots_on_gpus"].name == "slots_on_gpus"
    _on_a_gpu(monkeypatch, True)
    layer = MoEFeedForward(6, 32, seed=0)
    layer(TOKENS)
    assert layer.dispatch_path == "slots_on_gpus"


# === no read back to the host (torch) ===
@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile graph breaks")
@pytest.mark.parametrize(
    "path, kwargs",
    [
        ("grouped", dict(top_k=2, capacity_factor=1.0)),
        ("grouped", dict(routing="image", capacity_factor=None)),
        ("slots", dict(top_k=2, capacity_factor=1.0)),
    ],
)
def test_torch_paths_trace_without_a_host_sync(path, kwargs):
    # `fullgraph=True` fails on any read of a tensor's value on the host
    # (`.item()`, `.tolist()`, NumPy), the device syncs a GPU would wait on.
    # torch's grouped_mm traces only in bfloat16, as on a GPU.
    import torch

    layer = MoEFeedForward(
        6, 32, dispatch=path, seed=0, dtype="mixed_bfloat16", **kwargs
    )
    x = keras.ops.convert_to_tensor(TOKENS)
    eager = layer(x, training=True)
    compiled = torch.compile(
        lambda v: layer(v, training=True), fullgraph=True, backend="eager"
    )
    np.testing.assert_allclose(
        _np(keras.ops.cast(compiled(x), "float32")),
        _np(keras.ops.cast(eager, "float32")),
        atol=1e-2,
    )


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile graph breaks")
def test_the_torch_segment_path_reads_sizes_back_and_fails_fullgraph():
    # The control: the dynamic sorted path reads its segment sizes.
    import torch

    layer = MoEFeedForward(
        6, 32, dispatch="sorted", capacity_factor=None, seed=0
    )
    x = keras.ops.convert_to_tensor(TOKENS)
    layer(x, training=True)
    compiled = torch.compile(
        lambda v: layer(v, training=True), fullgraph=True, backend="eager"
    )
    with pytest.raises(Exception):
        compiled(x)


class _in_xla:
    """Pretends the trace is (or is not) under XLA."""

    def __init__(self, xla=True):
        self._xla = xla

    def __enter__(self):
        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(backends, "in_xla_context", lambda: self._xla)

    def __exit__(self, *exc):
        self._patch.undo()
