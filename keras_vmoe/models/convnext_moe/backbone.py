"""MoE-ConvNeXt backbone: hierarchical and isotropic ConvNeXt, MoE blocks."""

import keras
from keras_hub.models import Backbone

from keras_vmoe.models import moe_arguments
from keras_vmoe.models import preset_io
from keras_vmoe.models import registry
from keras_vmoe.models.convnext_moe import presets
from keras_vmoe.models.convnext_moe.layers import ConvNeXtBlock
from keras_vmoe.models.lora import LoRAMixin
from keras_vmoe.models.placement import MOE_PLACEMENTS  # noqa: F401
from keras_vmoe.models.placement import moe_block_indices
from keras_vmoe.models.quantization import ExpertQuantizationMixin
from keras_vmoe.validation import check_int
from keras_vmoe.validation import check_no_unknown_kwargs
from keras_vmoe.validation import check_number
from keras_vmoe.validation import deprecated_alias


def _check_positive_ints(name, values):
    if (
        not isinstance(values, (list, tuple))
        or not values
        or not all(isinstance(v, int) and v >= 1 for v in values)
    ):
        raise ValueError(
            f"`{name}` must be a non-empty list of positive integers. "
            f"Received: {name}={values!r}"
        )


def _check_convnext_numbers(
    patch_size,
    mlp_ratio,
    expert_mlp_ratio,
    layer_scale_init_value,
    drop_path_rate,
    layer_norm_epsilon,
):
    check_int("patch_size", patch_size)
    check_number("mlp_ratio", mlp_ratio, minimum=0, min_inclusive=False)
    check_number(
        "expert_mlp_ratio",
        expert_mlp_ratio,
        minimum=0,
        min_inclusive=False,
        allow_none=True,
    )
    check_number(
        "layer_scale_init_value", layer_scale_init_value, allow_none=True
    )
    check_number(
        "drop_path_rate", drop_path_rate, minimum=0, maximum=1,
        max_inclusive=False,
    )
    check_number(
        "layer_norm_epsilon", layer_norm_epsilon, minimum=0,
        min_inclusive=False,
    )


def _check_convnext_image_shape(image_shape, patch_size, num_stages):
    """(H, W, C) with H and W None or at least the total stride."""
    stride = patch_size * 2 ** (num_stages - 1)
    if (
        not isinstance(image_shape, (list, tuple))
        or len(image_shape) != 3
        or not all(
            size is None
            or (isinstance(size, int) and not isinstance(size, bool))
            for size in image_shape
        )
        or image_shape[2] is None
        or image_shape[2] < 1
    ):
        raise ValueError(
            "`image_shape` must be (height, width, channels) with known "
            "channels; height and width may be None. Received: "
            f"image_shape={image_shape!r}"
        )
    for size in image_shape[:2]:
        if size is not None and size < stride:
            raise ValueError(
                f"`image_shape` is too small: the stem (patch_size="
                f"{patch_size}) and {num_stages - 1} downsampling layers "
                f"reduce each side by {stride}, so height and width must be "
                f"at least {stride}. Received: image_shape={image_shape!r}"
            )
    return tuple(image_shape)


def _check_block_mlp_dims(block_mlp_dims, total_blocks):
    """`block_mlp_dims` as a list of `total_blocks` items (None = from the
    ratio)."""
    if block_mlp_dims is None:
        return [None] * total_blocks
    if (
        not isinstance(block_mlp_dims, (list, tuple))
        or len(block_mlp_dims) != total_blocks
        or not all(
            v is None
            or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
            for v in block_mlp_dims
        )
    ):
        raise ValueError(
            "`block_mlp_dims` must be None or a list with one item per block "
            f"({total_blocks}), each None or a positive integer. Received: "
            f"block_mlp_dims={block_mlp_dims!r}"
        )
    return list(block_mlp_dims)


def _check_dense_skip_blocks(dense_skip_blocks, depths, moe_positions):
    """`dense_skip_blocks` as a set of global indices of dense blocks."""
    if dense_skip_blocks is None:
        return set()
    total_blocks = sum(depths)
    moe_indices = {
        sum(depths[:stage]) + block for stage, block in moe_positions
    }
    if not isinstance(dense_skip_blocks, (list, tuple)) or not all(
        isinstance(v, int)
        and not isinstance(v, bool)
        and 0 <= v < total_blocks
        and v not in moe_indices
        for v in dense_skip_blocks
    ):
        raise ValueError(
            "`dense_skip_blocks` must be None or a list of global indices "
            f"(0..{total_blocks - 1}) of dense blocks; the MoE blocks are "
            f"{sorted(moe_indices)}. Received: "
            f"dense_skip_blocks={dense_skip_blocks!r}"
        )
    return set(dense_skip_blocks)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ConvNeXtMoEBackbone(
    LoRAMixin,
    ExpertQuantizationMixin,
    preset_io.PresetLoadingMixin,
    preset_io.PresetSavingMixin,
    Backbone,
):
    """ConvNeXt backbone whose chosen blocks have a Mixture-of-Experts MLP.

    Hierarchical ConvNeXt (Liu et al., 2022): a `patch_size` x `patch_size`
    patchify stem + LayerNorm, then stages of ConvNeXt blocks separated by
    downsampling layers (LayerNorm + 2x2 stride-2 convolution). The
    isotropic ConvNeXt (Liu et al., 2022, §isotropic) is one stage at
    constant width behind a 16x16 stem without LayerNorm or LayerScale.

    MoE-ConvNeXt (Videau et al., 2024, "Mixture of Experts in Image
    Classification: What's the Sweet Spot?"): in the blocks named by
    `moe_layers` the pointwise MLP becomes a `MoEFeedForward` in which
    every spatial position is a token (top-1 by default), with the
    paper's extra skip connection around it (see `ConvNeXtBlock`).

    The output is the last feature map, [B, H / stride, W / stride, d]
    without a final norm (the classifier pools, then normalises).

    Args:
        depths: blocks per stage, e.g. [3, 3, 9, 3] (ConvNeXt-T) or [18]
            (isotropic).
        hidden_dims: width of each stage, same length as `depths`.
        patch_size: stem kernel size and stride (4, or 16 for isotropic).
        stem_norm: LayerNorm after the stem convolution.
        mlp_ratio: hidden width of the dense MLPs, as a multiple of d.
        layer_scale_init_value: initial LayerScale, or None for none.
        drop_path_rate: stochastic-depth rate, rising linearly from 0 at
            the first block to this value at the last.
        layer_norm_epsilon: epsilon of every LayerNorm.
        moe_layers: which blocks are MoE: None (dense ConvNeXt),
            "every-2", "stage", "last-2", "last-3", or an explicit list of
            (stage, block) pairs or global block indices; see
            `moe_block_indices` (the named placements count stages, unlike
            the ViT's "last-L").
        num_experts, top_k, routing, router, router_dim, shared_expert,
        capacity_factor, eval_capacity_factor, group_size, eval_group_size,
        batch_prioritized_routing, normalize_gates, noisy_gating, noise_std,
        load_balance_loss_weight, importance_loss_weight, load_loss_weight,
        z_loss_weight, dispatch, seed, router_type, slots_per_expert,
        normalize, capacity_multiple_of, partial_groups: the MoE
            arguments, the same names and meaning in both families
            (`keras_vmoe.models.moe_arguments`); each MoE block
            gets a `MoEFeedForward` with these arguments (see its
            documentation; every feature-map position is a token), block
            `i` (counted over all blocks) with gating-noise seed
            `seed + i`. Defaults are those of `MoEFeedForward`, except
            `num_experts=4` and `routing="token"` (the paper);
            `ViTMoEBackbone` defaults to 8 experts and image routing.
            `router` must be a name ("linear" is the paper's 1x1 conv
            gate, "cosine", "l2"). `router_type` picks the layer: "top_k"
            (`MoEFeedForward`, all the arguments above but
            `slots_per_expert` and `normalize`), "soft"
            (`SoftMoEFeedForward`, every feature-map position of an image
            is a token; uses `num_experts`, `slots_per_expert`,
            `shared_expert`, `normalize`, `seed`) or "expert_choice"
            (`ExpertChoiceFeedForward`, per-image groups; uses
            `num_experts`, `capacity_factor`, `router`, `router_dim`,
            `shared_expert`, `seed`). The arguments a router type does not
            use must keep their defaults.
        expert_mlp_ratio: hidden width of each expert as a multiple of d;
            default `mlp_ratio`. The paper's ImageNet-1k hierarchical models
            use 2.
        moe_skip_connection: the Sweet-spot skip connection around the MoE.
        block_mlp_dims: None, or one item per block (global order, all
            stages): None to take the width from `mlp_ratio` /
            `expert_mlp_ratio`, or the MLP's (every expert's) hidden width
            in units. Model surgery sets it for the blocks it folds, whose
            dense MLP gets the experts' width.
        dense_skip_blocks: None, or global indices of dense blocks that
            keep the Sweet-spot skip connection around their MLP (MoE
            blocks that surgery folded into a dense MLP).
        image_shape: input shape (H, W, C); H and W may be None.
        dtype: dtype policy of the layers.
        moe_placement: deprecated alias of `moe_layers` (a
            `DeprecationWarning`; removed in 0.3).
        moe_kwargs: deprecated (a `DeprecationWarning`; removed in 0.3): a
            dict of MoE arguments, merged into the flat ones; a key that is
            not a MoE argument, or that repeats a flat argument with another
            value, raises a `ValueError`. `get_config` writes the flat
            arguments only.

    Example:
    >>> backbone = ConvNeXtMoEBackbone(
    ...     depths=[1, 1, 2, 1],
    ...     hidden_dims=[8, 16, 24, 32],
    ...     moe_layers="last-2",
    ...     num_experts=4,
    ...     expert_mlp_ratio=2,
    ...     image_shape=(64, 64, 3),
    ... )
    >>> backbone(np.ones((1, 64, 64, 3))).shape
    (1, 2, 2, 32)
    """

    def __init__(
        self,
        depths,
        hidden_dims,
        patch_size=4,
        stem_norm=True,
        mlp_ratio=4.0,
        layer_scale_init_value=1e-6,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        moe_layers=None,
        num_experts=4,
        top_k=1,
        routing="token",
        router="linear",
        router_dim=256,
        shared_expert=False,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        group_size=None,
        eval_group_size="image",
        batch_prioritized_routing=True,
        normalize_gates=False,
        noisy_gating=False,
        noise_std=None,
        load_balance_loss_weight=0.01,
        importance_loss_weight=0.0,
        load_loss_weight=0.0,
        z_loss_weight=0.0,
        dispatch="auto",
        seed=None,
        router_type="top_k",
        slots_per_expert=1,
        normalize=True,
        capacity_multiple_of=None,
        partial_groups="error",
        expert_mlp_ratio=None,
        moe_skip_connection=True,
        block_mlp_dims=None,
        dense_skip_blocks=None,
        image_shape=(None, None, 3),
        dtype=None,
        moe_placement=None,
        moe_kwargs=None,
        **kwargs,
    ):
        # keras.Model would silently ignore a misspelt argument.
        check_no_unknown_kwargs(type(self).__name__, kwargs)
        moe_layers = deprecated_alias(
            "moe_placement", moe_placement, "moe_layers", moe_layers, None
        )
        moe_values = moe_arguments.merge_moe_kwargs(
            moe_kwargs, moe_arguments.collect(locals()), "convnext"
        )
        _check_positive_ints("depths", depths)
        _check_positive_ints("hidden_dims", hidden_dims)
        if len(depths) != len(hidden_dims):
            raise ValueError(
                "`depths` and `hidden_dims` must have the same length. "
                f"Received: depths={depths!r}, hidden_dims={hidden_dims!r}"
            )
        _check_convnext_numbers(
            patch_size,
            mlp_ratio,
            expert_mlp_ratio,
            layer_scale_init_value,
            drop_path_rate,
            layer_norm_epsilon,
        )
        image_shape = _check_convnext_image_shape(
            image_shape, patch_size, len(depths)
        )
        moe_config = moe_arguments.build_moe_config(moe_values, "convnext")
        moe_positions = set(moe_block_indices(depths, moe_layers))
        expert_ratio = expert_mlp_ratio or mlp_ratio
        total_blocks = sum(depths)
        block_mlp_dims = _check_block_mlp_dims(block_mlp_dims, total_blocks)
        dense_skip_blocks = _check_dense_skip_blocks(
            dense_skip_blocks, depths, moe_positions
        )
        data_format = "channels_last"

        # === Layers ===
        self.stem_conv = keras.layers.Conv2D(
            hidden_dims[0],
            kernel_size=patch_size,
            strides=patch_size,
            data_format=data_format,
            dtype=dtype,
            name="stem_conv",
        )
        self.stem_norm = (
            keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, dtype=dtype, name="stem_norm"
            )
            if stem_norm
            else None
        )
        self.downsample_norms = []
        self.downsample_convs = []
        self.stage_blocks = []
        block_index = 0
        for stage, (depth, width) in enumerate(zip(depths, hidden_dims)):
            if stage > 0:
                self.downsample_norms.append(
                    keras.layers.LayerNormalization(
                        epsilon=layer_norm_epsilon,
                        dtype=dtype,
                        name=f"stage_{stage}_downsample_norm",
                    )
                )
                self.downsample_convs.append(
                    keras.layers.Conv2D(
                        width,
                        kernel_size=2,
                        strides=2,
                        data_format=data_format,
                        dtype=dtype,
                        name=f"stage_{stage}_downsample_conv",
                    )
                )
            blocks = []
            for block in range(depth):
                is_moe = (stage, block) in moe_positions
                rate = (
                    drop_path_rate * block_index / (total_blocks - 1)
                    if total_blocks > 1
                    else 0.0
                )
                blocks.append(
                    ConvNeXtBlock(
                        hidden_dim=width,
                        mlp_ratio=expert_ratio if is_moe else mlp_ratio,
                        mlp_dim=block_mlp_dims[block_index],
                        dense_skip_connection=(
                            block_index in dense_skip_blocks
                        ),
                        moe_config=(
                            moe_arguments.block_moe_config(
                                moe_config, block_index
                            )
                            if is_moe
                            else None
                        ),
                        moe_skip_connection=moe_skip_connection,
                        layer_scale_init_value=layer_scale_init_value,
                        drop_path_rate=rate,
                        layer_norm_epsilon=layer_norm_epsilon,
                        dtype=dtype,
                        name=f"stage_{stage}_block_{block}",
                    )
                )
                block_index += 1
            self.stage_blocks.append(blocks)

        # === Functional Model ===
        image_input = keras.Input(shape=image_shape, name="images")
        x = self.stem_conv(image_input)
        if self.stem_norm is not None:
            x = self.stem_norm(x)
        for stage, blocks in enumerate(self.stage_blocks):
            if stage > 0:
                x = self.downsample_norms[stage - 1](x)
                x = self.downsample_convs[stage - 1](x)
            for block in blocks:
                x = block(x)
        super().__init__(inputs=image_input, outputs=x, dtype=dtype, **kwargs)

        # === Config ===
        self.depths = list(depths)
        self.hidden_dims = list(hidden_dims)
        self.patch_size = patch_size
        self.stem_norm_enabled = stem_norm
        self.mlp_ratio = mlp_ratio
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        # Explicit placements are stored as JSON would restore them.
        self.moe_layers = (
            [list(p) if isinstance(p, (list, tuple)) else p for p in moe_layers]
            if isinstance(moe_layers, (list, tuple))
            else moe_layers
        )
        moe_arguments.set_attributes(self, moe_values)
        self.expert_mlp_ratio = expert_mlp_ratio
        self.moe_skip_connection = moe_skip_connection
        self.block_mlp_dims = (
            None if all(v is None for v in block_mlp_dims) else block_mlp_dims
        )
        self.dense_skip_blocks = sorted(dense_skip_blocks) or None
        self.image_shape = tuple(image_shape)
        self.data_format = data_format
        self.moe_positions = sorted(moe_positions)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a backbone from a preset name, a directory or a hub handle.

        Args:
            preset: a name from `keras_vmoe.models.list_presets()` (built
                from the table; with `load_weights` its dense checkpoint is
                converted and upcycled), a local KerasHub preset directory,
                or a KerasHub handle.
            load_weights: load pretrained weights.
            **kwargs: for a preset name, `weights_path`,
                `upcycle_noise_std`, `upcycle_seed` and constructor
                overrides (see
                `keras_vmoe.models.convnext_moe.preset_builder.build_model`);
                otherwise passed to KerasHub.
        """
        if isinstance(preset, str) and preset in presets.PRESETS:
            return registry.build_preset(cls, preset, load_weights, **kwargs)
        preset_io.check_preset_name(preset, "ConvNeXtMoE", cls.__name__)
        preset_io.check_preset_dir(preset, False, load_weights, **kwargs)
        return preset_io._wrap_loading_errors(
            preset,
            lambda: super(ConvNeXtMoEBackbone, cls).from_preset(
                preset, load_weights=load_weights, **kwargs
            ),
        )

    @property
    def blocks(self):
        """All ConvNeXt blocks, in order."""
        return [block for blocks in self.stage_blocks for block in blocks]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "depths": self.depths,
                "hidden_dims": self.hidden_dims,
                "patch_size": self.patch_size,
                "stem_norm": self.stem_norm_enabled,
                "mlp_ratio": self.mlp_ratio,
                "layer_scale_init_value": self.layer_scale_init_value,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "moe_layers": self.moe_layers,
                **moe_arguments.get_config(self),
                "expert_mlp_ratio": self.expert_mlp_ratio,
                "moe_skip_connection": self.moe_skip_connection,
                "block_mlp_dims": self.block_mlp_dims,
                "dense_skip_blocks": self.dense_skip_blocks,
                "image_shape": self.image_shape,
            }
        )
        return config
