"""Expert parallelism on `keras.distribution` (JAX backend, XLA GSPMD).

`expert_parallel(model)` returns a `keras.distribution.ModelParallel` that

- lays the devices out on a 2-D mesh `(batch_axis, expert_axis)`;
- shards every stacked expert weight of every MoE layer (`MoEFeedForward`,
  `SoftMoEFeedForward`, `ExpertChoiceFeedForward`; kernels
  [E, d, h] and [E, h, d], biases [E, h] and [E, d]) on its expert axis
  over `expert_axis`, and replicates it over `batch_axis`;
- shards the input batch over *all* devices (both mesh axes, as vmoe);
- makes every MoE layer constrain its dispatch buffers: the
  [G, E, C, P, d] buffer sharded on G (groups stay on the device that holds
  their tokens), the [E, G, C, P, d] buffer sharded on E over `expert_axis`
  and on G over `batch_axis` (Expert Choice: [G, E, C, d] and
  [E, G, C, d]; Soft MoE: the slots [B, E, S, d] and [E, B, S, d]).
  Between the two, XLA's partitioner emits an all-to-all; the expert
  weights never move.

Without the buffer constraints GSPMD would all-gather the [E, d, h]
weights to where the tokens are instead; the constraints are what make
this expert parallelism.

The layout of a variable is fixed when the variable is created, so the
model must be created under the distribution:

    distribution = expert_parallel(model)  # model: a template, any device
    model = distribute_model(model, distribution)  # re-created, copied
    keras.distribution.set_distribution(distribution)
    model.compile(...)
    model.fit(...)

or, with a preset: `with distribution.scope(): model = from_preset(...)`
(the layout keys are regexes over variable paths, so they match the fresh
model too). `keras.distribution.set_distribution(distribution)` makes it
global instead of scoped.

Expert parallelism needs routing groups (`group_size` on every MoE layer):
routing over the whole batch would need the whole batch on every device.
Plain `keras.distribution.DataParallel` works with any `group_size`.
"""

import math
import re

import keras

# Re-exported: the hook the MoE layers call; `ExpertParallel.
# dispatch_constraint` answers it.
from keras_vmoe.layers.distribution_hooks import dispatch_constraint

EXPERT_KERNEL_KEY = r"(?:.*/)?expert_kernel_[12]"
EXPERT_BIAS_KEY = r"(?:.*/)?expert_bias_[12]"


def _require_jax(what):
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"{what} needs the JAX backend: `keras.distribution` shards "
            "tensors and emits the all-to-all only through XLA GSPMD on "
            f"JAX. Set KERAS_BACKEND=jax. Received: backend={backend!r}"
        )


class _MultiAxisLayout(keras.distribution.TensorLayout):
    """A `TensorLayout` whose entries may be tuples of mesh axis names.

    `PartitionSpec(("batch", "expert"), None)` shards a dimension over
    both mesh axes (every device gets its own slice); Keras' own
    `TensorLayout` accepts single axis names only.
    """

    def _validate_axes(self):
        if not self.device_mesh:
            return
        valid = set(self.device_mesh.axis_names)
        names = set()
        for axis in self.axes:
            names.update(axis if isinstance(axis, tuple) else (axis,))
        unknown = names - valid - {None}
        if unknown:
            raise ValueError(
                f"Layout axes must be mesh axis names {sorted(valid)}. "
                f"Received: axes={self.axes}"
            )


class ExpertParallel(keras.distribution.ModelParallel):
    """`ModelParallel` with experts on `expert_axis`, data on all devices.

    Build it with `expert_parallel`. `batch_dim_name` is `batch_axis`, but
    the data is sharded over both mesh axes, so `num_model_replicas` (data
    shards) is the number of devices.
    """

    def __init__(self, *, layout_map, batch_axis, expert_axis, **kwargs):
        super().__init__(
            layout_map=layout_map, batch_dim_name=batch_axis, **kwargs
        )
        self.batch_axis = batch_axis
        self.expert_axis = expert_axis

    @property
    def data_axes(self):
        """Mesh axes the batch (and the routing groups) are sharded over."""
        return (self.batch_axis, self.expert_axis)

    @property
    def expert_shards(self):
        """Number of devices the experts of one layer are split over."""
        mesh = self.device_mesh
        return mesh.shape[list(mesh.axis_names).index(self.expert_axis)]

    @property
    def num_model_replicas(self):
        return self.device_mesh.devices.size

    def get_data_layout(self, data_shape):
        axes = [None] * len(data_shape)
        axes[0] = self.data_axes
        return _MultiAxisLayout(axes, self.device_mesh)

    def dispatch_layout(self, name, rank):
        """Layout of a dispatch buffer of `slot_dispatch` (see `constrain`)."""
        if name in ("dispatch_groups", "combine_groups"):  # [G, E, ...]
            axes = (self.data_axes, None)
        else:  # [E, G, ...]
            axes = (self.expert_axis, self.batch_axis)
        axes = axes + (None,) * (rank - 2)
        return _MultiAxisLayout(axes, self.device_mesh)

    def dispatch_constraint(self, layer):
        """The `constrain` hook of `slot_dispatch` for `layer`.

        `constrain(tensor, name)` places a buffer: names `"dispatch_groups"`
        and `"combine_groups"` for [G, E, ...] buffers (sharded on G over
        all devices), `"dispatch_experts"` and `"combine_experts"` for
        [E, G, ...] buffers (E over the expert axis, G over the batch
        axis). `MoEFeedForward`, `ExpertChoiceFeedForward` and
        `SoftMoEFeedForward` (groups = images) use it through
        `dispatch_constraint(layer)` while this distribution is active. It
        needs routing groups, so an MoE layer without `group_size` raises
        instead of routing the whole batch on every device.
        """
        _require_jax("Expert parallelism")
        whole_batch = _whole_batch_groups(layer)
        if whole_batch:
            received = ", ".join(f"{name}=None" for name in whole_batch)
            raise ValueError(
                "Expert parallelism needs routing groups: set `group_size` "
                "(training) and keep `eval_group_size` (inference) a group "
                f"size on MoE layer {layer.path!r}. Received: {received}"
            )

        def constrain(tensor, name):
            layout = self.dispatch_layout(name, len(tensor.shape))
            return keras.distribution.distribute_tensor(tensor, layout)

        return constrain


def _moe_layers(model):
    """The MoE layers of `model` (or the layer itself), depth-first."""
    from keras_vmoe.layers.moe_types import find_moe_layers

    return find_moe_layers(model)


def moe_layers(model):
    """Deprecated: `keras_vmoe.layers.find_moe_layers(model)` (`moe_layers`
    names the placement argument of the backbones)."""
    from keras_vmoe.validation import warn_deprecated

    warn_deprecated(
        "moe_layers(model)", "`keras_vmoe.layers.find_moe_layers(model)`"
    )
    return _moe_layers(model)


def _whole_batch_groups(layer):
    """The routing-group arguments of an MoE layer that are None (the whole
    batch as one group): `group_size` in training, `eval_group_size` at
    inference. Soft MoE always routes per image."""
    return [
        name
        for name in ("group_size", "eval_group_size")
        if getattr(layer, name, "image") is None
    ]


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


def _make_mesh(layers, mesh, devices, expert_shards, batch_axis, expert_axis):
    if mesh is not None:
        if devices is not None or expert_shards is not None:
            raise ValueError(
                "Pass either `mesh` or `devices`/`expert_shards`. Received: "
                f"mesh={mesh}, devices={devices!r}, "
                f"expert_shards={expert_shards!r}"
            )
        if set(mesh.axis_names) != {batch_axis, expert_axis} or len(
            mesh.axis_names
        ) != 2:
            raise ValueError(
                f"`mesh` must have exactly the axes ({batch_axis!r}, "
                f"{expert_axis!r}). Received: mesh={mesh}"
            )
        return mesh
    if devices is None:
        devices = keras.distribution.list_devices()
    elif isinstance(devices, int) and not isinstance(devices, bool):
        _check_positive_int("devices", devices)
        available = keras.distribution.list_devices()
        if devices > len(available):
            raise ValueError(
                f"`devices` asks for {devices} devices but only "
                f"{len(available)} are visible. Received: devices={devices}"
            )
        devices = available[:devices]
    devices = list(devices)
    num_devices = len(devices)
    if expert_shards is None:
        # As many shards as the devices and every layer's E allow.
        expert_shards = num_devices
        for layer in layers:
            expert_shards = math.gcd(expert_shards, layer.num_experts)
    _check_positive_int("expert_shards", expert_shards)
    if num_devices % expert_shards:
        raise ValueError(
            "`expert_shards` must divide the number of devices "
            f"({num_devices}). Received: expert_shards={expert_shards}"
        )
    return keras.distribution.DeviceMesh(
        (num_devices // expert_shards, expert_shards),
        [batch_axis, expert_axis],
        devices,
    )


def get_layout_map(mesh, expert_axis="expert", extra_layouts=None):
    """The `LayoutMap` of expert parallelism on `mesh`.

    Keys are regexes over variable paths (`LayoutMap` full-matches them):
    stacked expert kernels are sharded `(expert_axis, None, None)` and
    expert biases `(expert_axis, None)`; everything else is replicated.
    Optimizer slots inherit their variable's layout.

    Args:
        mesh: a `keras.distribution.DeviceMesh` with an `expert_axis`.
        expert_axis: mesh axis that splits the experts.
        extra_layouts: optional dict of further regex -> axes tuple.
    """
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[EXPERT_KERNEL_KEY] = (expert_axis, None, None)
    layout_map[EXPERT_BIAS_KEY] = (expert_axis, None)
    for key, axes in (extra_layouts or {}).items():
        layout_map[key] = tuple(axes)
    return layout_map


def check_layout_map(layout_map, model):
    """Raises if a `layout_map` key matches none of `model`'s variables.

    A key that matches nothing is almost always a typo that would silently
    leave weights replicated.
    """
    paths = [variable.path for variable in model.variables]
    for key in layout_map:
        if not any(re.fullmatch(key, path) for path in paths):
            raise ValueError(
                f"Layout map key {key!r} matches no variable of the model "
                f"(its variable paths are, e.g., {paths[:3]}). Received: "
                f"key={key!r}"
            )


def expert_parallel(
    model,
    mesh=None,
    *,
    devices=None,
    expert_shards=None,
    expert_axis="expert",
    batch_axis="batch",
    extra_layouts=None,
):
    """A distribution that shards `model`'s experts over devices.

    The model (a task, a backbone, a `MoEFeedForward`, built) serves as a
    template: it is checked, not changed. Create the model that will run
    under the returned distribution (`distribute_model`, or build it in
    `distribution.scope()`).

    Args:
        model: a built Keras model or MoE layer.
        mesh: optional 2-D `DeviceMesh` with axes `batch_axis` and
            `expert_axis`. Default: all devices (or `devices`) as
            `(n / expert_shards, expert_shards)`.
        devices: device list or count (the first `devices` devices).
        expert_shards: devices one layer's experts are split over; default
            `gcd(devices, E of every MoE layer)`. Must divide every E.
        expert_axis, batch_axis: mesh axis names.
        extra_layouts: dict of further regex -> axes for the layout map.

    Returns:
        An `ExpertParallel` (a `keras.distribution.ModelParallel`).

    Raises:
        ValueError: a backend other than JAX; no MoE layer; an MoE layer
            without `group_size` or with `eval_group_size=None`; E not
            divisible by the expert shards; a layout key that matches no
            variable.
    """
    _require_jax("Expert parallelism")
    layers = _moe_layers(model)
    if not layers:
        raise ValueError(
            f"`model` has no MoE layer to shard. Received: "
            f"model={getattr(model, 'name', model)!r}"
        )
    ungrouped = {
        layer.path: _whole_batch_groups(layer)
        for layer in layers
        if _whole_batch_groups(layer)
    }
    if ungrouped:
        raise ValueError(
            "Expert parallelism needs routing groups: set `group_size` on "
            "every MoE layer (e.g. images per device for image routing, "
            "tokens per device or a divisor for token routing), and keep "
            "`eval_group_size` a group size (its default, 'image', is), so "
            "routing never needs the whole batch on one device. Layers "
            f"and their arguments that are None: {ungrouped}"
        )
    mesh = _make_mesh(
        layers, mesh, devices, expert_shards, batch_axis, expert_axis
    )
    shards = mesh.shape[list(mesh.axis_names).index(expert_axis)]
    for layer in layers:
        if layer.num_experts % shards:
            raise ValueError(
                f"Every MoE layer's `num_experts` must be a multiple of the "
                f"expert shards ({shards}). Received: "
                f"num_experts={layer.num_experts} in {layer.path}"
            )
    layout_map = get_layout_map(mesh, expert_axis, extra_layouts)
    check_layout_map(layout_map, model)
    return ExpertParallel(
        layout_map=layout_map, batch_axis=batch_axis, expert_axis=expert_axis
    )


def distribute_model(model, distribution):
    """Re-creates `model` under `distribution` and copies its weights.

    A variable's sharding is fixed when it is created, so an existing model
    (for example one from `from_preset`) is rebuilt from its config inside
    `distribution.scope()`, and its weights (including non-trainable state)
    are copied into the sharded variables. Compile the returned model;
    optimizer state is not copied.

    Args:
        model: a built Keras model (task, backbone or functional model).
        distribution: a `keras.distribution.Distribution`.

    Returns:
        The new model.
    """
    if not (
        hasattr(distribution, "scope")
        and hasattr(distribution, "get_variable_layout")
    ):
        raise TypeError(
            "`distribution` must be a keras.distribution distribution "
            "(DataParallel, ModelParallel, `expert_parallel(...)`). "
            f"Received: distribution={distribution!r}"
        )
    if isinstance(distribution, ExpertParallel):
        _require_jax("Expert parallelism")
    weights = model.get_weights()
    with distribution.scope():
        clone = model.__class__.from_config(model.get_config())
        if not clone.built:
            clone.build(model.input_shape)
        clone.set_weights(weights)
    return clone


def distribute_for_training(model, devices=None, expert_shards=None):
    """Sets a global distribution and re-creates `model` under it.

    `expert_shards` given: `expert_parallel(model, devices=devices,
    expert_shards=expert_shards)`; otherwise `DataParallel` over the first
    `devices` devices (all by default). The distribution stays set
    (`keras.distribution.set_distribution`) for compile, fit and evaluate.
    This is what `keras-vmoe train --devices/--expert-parallel` calls.
    """
    _require_jax("Distributed training")
    if expert_shards is not None:
        distribution = expert_parallel(
            model, devices=devices, expert_shards=expert_shards
        )
    else:
        available = keras.distribution.list_devices()
        count = len(available) if devices is None else devices
        _check_positive_int("devices", count)
        if count > len(available):
            raise ValueError(
                f"`devices` asks for {count} devices but only "
                f"{len(available)} are visible. Received: devices={count}"
            )
        distribution = keras.distribution.DataParallel(
            devices=available[:count]
        )
    model = distribute_model(model, distribution)
    keras.distribution.set_distribution(distribution)
    return model


def expert_shardings(model):
    """`{variable path: sharding spec}` of every stacked expert weight.

    For tests and logging: the spec is the variable's JAX `PartitionSpec`
    as a tuple, e.g. `("expert", None, None)`.
    """
    _require_jax("Reading shardings")
    specs = {}
    for variable in model.variables:
        if re.fullmatch(EXPERT_KERNEL_KEY, variable.path) or re.fullmatch(
            EXPERT_BIAS_KEY, variable.path
        ):
            sharding = variable.value.sharding
            spec = getattr(sharding, "spec", None)
            specs[variable.path] = tuple(spec) if spec is not None else None
    return specs


__all__ = [
    "ExpertParallel",
    "check_layout_map",
    "dispatch_constraint",
    "distribute_for_training",
    "distribute_model",
    "expert_parallel",
    "expert_shardings",
    "get_layout_map",
    "moe_layers",
]
