"""Parameters, active parameters and FLOPs of any keras-vmoe model.

Conventions (chosen to reproduce the ViMoE paper's Table 1, which counts
with fvcore and fused attention):
- FLOPs are multiply-accumulates of the dense / einsum / convolution layers,
  of the routers and of the experts each token actually uses (K routed
  experts, plus the shared expert's own dense layers), plus fvcore's
  normalisation estimate: 5 per element for an affine LayerNorm or
  GroupNorm (4 without affine), 2 per element for an affine BatchNorm at
  inference (1 without). Attention score products (QK^T, AV), activations,
  residual additions and position-embedding resampling are not counted.
  Capacity padding is not counted: a token-routed layer costs K experts per
  token whatever its capacity factor.
- Parameters are the weights created trainable, frozen or not (what
  PyTorch counts as parameters); state such as BatchNorm moving statistics
  or a MoE layer's `expert_load` is not counted.
- Active parameters leave out, in every `MoEFeedForward`, the E - K routed
  experts an item does not use. A `SoftMoEFeedForward` or
  `ExpertChoiceFeedForward` runs every expert on part of every image, so
  all its experts are active.
- Soft MoE costs, per image of T tokens and E*C slots, the logits
  `x phi` (T*d*E*C), the dispatch and combine einsums (2*T*E*C*d) and E*C expert
  rows; Expert Choice its router and E*C expert rows per routing group
  (C = ceil(S * capacity_factor / E)).

Shapes come from one eager forward pass at batch 1, with every layer's
`call` wrapped to record its input and output shapes, so nested layers
(blocks, MoE layers, their shared experts and routers) are all seen.
"""

import math

import keras
import numpy as np

from keras_vmoe.layers.base import MoELayer
from keras_vmoe.layers.moe_types import find_moe_layers
from keras_vmoe.layers.routers import CosineRouter
from keras_vmoe.layers.routers import L2Router
from keras_vmoe.layers.routers import LinearRouter

_ROUTERS = (LinearRouter, CosineRouter, L2Router)
_CONVOLUTIONS = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)


def _shape(value):
    return tuple(value.shape)


def _einsum_macs(equation, input_shape, kernel_shape, output_shape):
    """Product of the sizes of every index of an `EinsumDense` equation."""
    operands, output_spec = equation.split("->")
    input_spec, kernel_spec = operands.split(",")
    sizes = {}
    for spec, shape in (
        (input_spec, input_shape),
        (kernel_spec, kernel_shape),
        (output_spec, output_shape),
    ):
        if "..." in spec:
            before, after = spec.split("...")
            stop = len(shape) - len(after)
            sizes["..."] = math.prod(shape[len(before) : stop])
            spec, shape = before + after, shape[: len(before)] + shape[stop:]
        sizes.update(zip(spec, shape))
    return math.prod(sizes.values())


def _expert_params(moe):
    """Parameters of one routed expert of a `MoEFeedForward`."""
    weights = (
        moe.expert_kernel_1,
        moe.expert_bias_1,
        moe.expert_kernel_2,
        moe.expert_bias_2,
    )
    return sum(math.prod(w.shape) for w in weights) // moe.num_experts


def _layer_flops(layer, input_shape, output_shape):
    """MACs of one call of a leaf layer, or None if the layer is not counted."""
    if isinstance(layer, MoELayer):
        return layer.routing_macs(input_shape) + layer.expert_rows(
            input_shape
        ) * _expert_macs(layer)
    if isinstance(layer, _ROUTERS):
        rows = math.prod(input_shape[:-1])
        return rows * sum(
            math.prod(w.shape) for w in layer.weights if len(w.shape) == 2
        )
    if isinstance(layer, keras.layers.Dense):
        return math.prod(input_shape[:-1]) * math.prod(layer.kernel.shape)
    if isinstance(layer, keras.layers.EinsumDense):
        return _einsum_macs(
            layer.equation, input_shape, tuple(layer.kernel.shape), output_shape
        )
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel_size = math.prod(layer.kernel.shape[:-2])
        return math.prod(output_shape[1:]) * kernel_size
    if isinstance(layer, _CONVOLUTIONS):
        # kernel [*window, in / groups, out]: each output element costs
        # window * in / groups MACs.
        return math.prod(output_shape[1:]) * math.prod(layer.kernel.shape[:-1])
    if isinstance(
        layer,
        (keras.layers.LayerNormalization, keras.layers.GroupNormalization),
    ):
        affine = layer.center or layer.scale
        return math.prod(input_shape) * (5 if affine else 4)
    if isinstance(layer, keras.layers.BatchNormalization):
        affine = layer.center or layer.scale
        return math.prod(input_shape) * (2 if affine else 1)
    return None


def _expert_macs(moe):
    """MACs of one expert on one token: d*h + h*d."""
    return math.prod(moe.expert_kernel_1.shape[1:]) + math.prod(
        moe.expert_kernel_2.shape[1:]
    )


def _own_params(layer):
    """Parameters a layer created itself (not those of its sublayers: a MoE
    layer's router and shared expert have their own rows)."""
    return int(sum(math.prod(v.shape) for v in layer._trainable_variables))


def layer_stats(model, image_size=224):
    """Per-layer FLOPs of one image, in call order.

    Args:
        model: a built Keras model taking images [B, H, W, C].
        image_size: int or (height, width) of the image.

    Returns:
        A list of dicts, one per counted layer call: `path`, `class_name`,
        `input_shape`, `output_shape`, `flops` (MACs, see module docstring)
        and `params` (the layer's own parameters, counted at its first call;
        for a `MoEFeedForward` the experts and router, without its shared
        expert, which has its own rows).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    records = []
    seen = set()
    patched = []

    def wrap(layer, call):
        def recording_call(*args, **kwargs):
            outputs = call(*args, **kwargs)
            first = keras.tree.flatten(args[0] if args else kwargs)[0]
            output = keras.tree.flatten(outputs)[0]
            input_shape, output_shape = _shape(first), _shape(output)
            flops = _layer_flops(layer, input_shape, output_shape)
            if flops is not None:
                records.append(
                    {
                        "path": layer.path,
                        "class_name": type(layer).__name__,
                        "input_shape": input_shape,
                        "output_shape": output_shape,
                        "flops": int(flops),
                        "params": (
                            _own_params(layer) if id(layer) not in seen else 0
                        ),
                    }
                )
                seen.add(id(layer))
            return outputs

        return recording_call

    for layer in model._flatten_layers(include_self=False):
        if "call" in layer.__dict__:
            continue
        patched.append(layer)
        layer.call = wrap(layer, layer.call)
    try:
        channels = model.input.shape[-1]
        images = np.zeros((1, *image_size, channels), dtype="float32")
        model(images, training=False)
    finally:
        for layer in patched:
            del layer.call
    return records


def _count_parameters(model):
    # `_trainable_variables` lists the weights a layer created trainable; it
    # keeps them when the layer is frozen, unlike `trainable_weights`.
    parameters = {
        id(variable): variable
        for layer in model._flatten_layers()
        for variable in layer._trainable_variables
    }
    return int(sum(math.prod(v.shape) for v in parameters.values()))


def model_stats(model, image_size=224):
    """Parameters, active parameters and FLOPs of a model on one image.

    Args:
        model: any keras-vmoe model (backbone or classifier) taking images.
        image_size: int or (height, width) of the image.

    Returns:
        `{"params": int, "active_params": int, "flops": int}`; see the module
        docstring for what is counted.

    Example:
    >>> stats = model_stats(backbone, image_size=224)
    >>> stats["flops"] / 1e9
    """
    inactive = sum(
        (layer.num_experts - layer.top_k) * _expert_params(layer)
        for layer in find_moe_layers(model, router_type="top_k")
    )
    params = _count_parameters(model)
    flops = sum(record["flops"] for record in layer_stats(model, image_size))
    return {
        "params": params,
        "active_params": params - int(inactive),
        "flops": int(flops),
    }
