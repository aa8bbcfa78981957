"""`ViTMoEBackbone`: a DINOv2-style ViT whose chosen blocks are MoE."""

import numbers

import keras
import keras_hub
from keras import ops

from keras_vmoe.layers.feed_forward import check_activation
from keras_vmoe.layers.moe_types import build_moe_layer
from keras_vmoe.models import moe_arguments
from keras_vmoe.models import preset_io
from keras_vmoe.models import registry
from keras_vmoe.models.lora import LoRAMixin
from keras_vmoe.models.placement import resolve_moe_layers
from keras_vmoe.models.quantization import ExpertQuantizationMixin
from keras_vmoe.models.vit_moe import presets
from keras_vmoe.models.vit_moe.layers import ViTBlock
from keras_vmoe.models.vit_moe.layers import ViTEmbedding
from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS
from keras_vmoe.validation import check_int
from keras_vmoe.validation import check_no_unknown_kwargs
from keras_vmoe.validation import check_number


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ViTMoEBackbone(
    LoRAMixin,
    ExpertQuantizationMixin,
    preset_io.PresetLoadingMixin,
    preset_io.PresetSavingMixin,
    keras_hub.models.Backbone,
):
    """DINOv2-style Vision Transformer with Mixture-of-Experts blocks.

    A ViT (Dosovitskiy et al., 2021) in the DINOv2 form (Oquab et al.,
    2023): Conv2D patch embedding, CLS token, optional register tokens, a
    learned position embedding resampled (antialiased bicubic, as timm) when
    the image grid differs from the one it was trained at, pre-norm blocks
    (LayerNorm eps 1e-6, qkv bias, optional LayerScale, exact GELU,
    stochastic depth) and a final LayerNorm. The blocks chosen by
    `moe_layers` replace their MLP by `MoEFeedForward` — ViMoE (image
    routing from the CLS token, top-1, optional shared expert; "ViMoE: An
    Empirical Study of Designing Vision Mixture-of-Experts") or the
    Sweet-spot ViT-MoE (token routing, top-2; "Mixture of Experts in Image
    Classification: What's the Sweet Spot?").

    The output is the normalised token sequence [B, 1 + R + H*W, d] ordered
    `[CLS, registers, patches]`. Block `i` is the layer named `block_{i}`.
    Auxiliary MoE losses are added in training mode and are part of
    `model.losses`.

    Args:
        image_shape: (height, width, channels) of the input images; height
            and width must be known and divisible by `patch_size`.
        patch_size: side of the square patches.
        num_layers: number of transformer blocks.
        num_heads: attention heads; must divide `hidden_dim`.
        hidden_dim: token width d.
        mlp_dim: hidden width of each MLP and expert.
        num_register_tokens: register tokens after CLS.
        position_embedding_shape: (height, width) in pixels of the image size
            the position embedding is stored for (DINOv2: (518, 518)).
            Default: `image_shape[:2]`.
        layer_scale_init_value: LayerScale initial value (DINOv2: 1e-5), or
            None for no LayerScale.
        drop_path_rate: stochastic depth rate of the last block; it grows
            linearly from 0 at the first block (timm).
        layer_norm_epsilon: LayerNorm epsilon.
        activation: activation of every MLP and expert: "gelu" (exact, as
            timm and DINOv2) or "gelu_tanh" (the tanh approximation, flax's
            default, which vmoe's models use).
        moe_layers: which blocks are MoE, see `resolve_moe_layers`: None or
            [] (dense), "last-L", "every-n", an int L (last L blocks), or a
            list of indices.
        ensemble_size: M, members of an E^3 ensemble (Allingham et al.,
            2022): before the first MoE block every image is repeated M
            times (copies consecutive), and every MoE block routes copy m
            among its own E/M experts (`MoEFeedForward`'s `ensemble_size`).
            The output then has B*M rows; `ViTMoEImageClassifier` combines
            the members' predictions. 1 (default): no ensemble. Needs
            `router_type="top_k"`, token routing and MoE blocks.
        num_experts, top_k, routing, router, router_dim, shared_expert,
        capacity_factor, eval_capacity_factor, group_size, eval_group_size,
        batch_prioritized_routing, normalize_gates, noisy_gating, noise_std,
        load_balance_loss_weight, importance_loss_weight, load_loss_weight,
        z_loss_weight, dispatch, seed, router_type, slots_per_expert,
        normalize, capacity_multiple_of, partial_groups: the MoE
            arguments, the same names and meaning in both families
            (`keras_vmoe.models.moe_arguments`); each MoE block
            gets a `MoEFeedForward` with these arguments (see its
            documentation), block `i` with gating-noise seed `seed + i`.
            Defaults are those of `MoEFeedForward`, except
            `num_experts=8` and `routing="image"` (ViMoE);
            `ConvNeXtMoEBackbone` defaults to 4 experts and token routing.
            `router` must be a name ("linear", "cosine", "l2"): each MoE
            block builds its own. `router_type` picks the layer: "top_k"
            (`MoEFeedForward`, all the arguments above but
            `slots_per_expert` and `normalize`), "soft"
            (`SoftMoEFeedForward`: uses `num_experts`, `slots_per_expert`,
            `shared_expert`, `normalize`, `seed`) or "expert_choice"
            (`ExpertChoiceFeedForward`, per-image groups: uses
            `num_experts`, `capacity_factor`, `router`, `router_dim`,
            `shared_expert`, `seed`). The arguments a router type does not
            use must keep their defaults (Soft MoE and Expert Choice add
            no auxiliary loss).
        dtype: dtype policy of the model (e.g. "mixed_bfloat16").

    Example:
    >>> backbone = ViTMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=4, num_heads=2,
    ...     hidden_dim=32, mlp_dim=64, moe_layers="last-2", num_experts=4,
    ...     routing="image", shared_expert=True)
    >>> backbone(np.ones((2, 32, 32, 3))).shape
    (2, 17, 32)
    """

    def __init__(
        self,
        image_shape=(224, 224, 3),
        patch_size=16,
        num_layers=12,
        num_heads=6,
        hidden_dim=384,
        mlp_dim=1536,
        num_register_tokens=0,
        position_embedding_shape=None,
        layer_scale_init_value=None,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        activation="gelu",
        moe_layers=None,
        ensemble_size=1,
        num_experts=8,
        top_k=1,
        routing="image",
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
        dtype=None,
        **kwargs,
    ):
        # keras.Model would silently ignore a misspelt argument.
        check_no_unknown_kwargs(type(self).__name__, kwargs)
        if not isinstance(image_shape, (list, tuple)):
            raise ValueError(
                "`image_shape` must be (height, width, channels). Received: "
                f"image_shape={image_shape!r}"
            )
        image_shape = tuple(image_shape)
        for name, value in (
            ("patch_size", patch_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("hidden_dim", hidden_dim),
            ("mlp_dim", mlp_dim),
        ):
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < 1
            ):
                raise ValueError(
                    f"`{name}` must be a positive integer. Received: "
                    f"{name}={value!r}"
                )
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. Received: "
                f"hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        if (
            len(image_shape) != 3
            or any(
                not isinstance(size, numbers.Integral) or size < 1
                for size in image_shape
            )
            or image_shape[0] % patch_size
            or image_shape[1] % patch_size
        ):
            raise ValueError(
                "`image_shape` must be (height, width, channels) of positive "
                "integers, height and width divisible by `patch_size`. "
                "Received: "
                f"image_shape={image_shape}, patch_size={patch_size}"
            )
        position_shape = tuple(position_embedding_shape or image_shape[:2])
        if len(position_shape) < 2 or any(
            size < patch_size for size in position_shape[:2]
        ):
            raise ValueError(
                "`position_embedding_shape` must be (height, width) of at "
                "least one patch. Received: "
                f"position_embedding_shape={position_embedding_shape!r}"
            )
        if not isinstance(num_register_tokens, int) or num_register_tokens < 0:
            raise ValueError(
                "`num_register_tokens` must be an integer >= 0. Received: "
                f"num_register_tokens={num_register_tokens!r}"
            )
        check_number(
            "drop_path_rate",
            drop_path_rate,
            minimum=0,
            maximum=1,
            max_inclusive=False,
        )
        check_number(
            "layer_norm_epsilon",
            layer_norm_epsilon,
            minimum=0,
            min_inclusive=False,
        )
        check_number(
            "layer_scale_init_value", layer_scale_init_value, allow_none=True
        )
        check_activation(activation)
        moe_values = moe_arguments.collect(locals())
        moe_config = moe_arguments.build_moe_config(moe_values, "vit")
        moe_indices = resolve_moe_layers(moe_layers, num_layers)
        moe_config = _with_ensemble(
            moe_config, ensemble_size, moe_indices, router_type
        )

        # === Layers ===
        self.embedding = ViTEmbedding(
            hidden_dim,
            patch_size,
            position_embedding_grid=(
                position_shape[0] // patch_size,
                position_shape[1] // patch_size,
            ),
            num_register_tokens=num_register_tokens,
            dtype=dtype,
            name="embedding",
        )
        self.transformer_layers = [
            ViTBlock(
                num_heads,
                mlp_dim,
                layer_scale_init_value=layer_scale_init_value,
                drop_path_rate=(
                    drop_path_rate * i / (num_layers - 1)
                    if num_layers > 1
                    else 0.0
                ),
                layer_norm_epsilon=layer_norm_epsilon,
                activation=activation,
                moe_config=(
                    moe_arguments.block_moe_config(moe_config, i)
                    if i in moe_indices
                    else None
                ),
                dtype=dtype,
                name=f"block_{i}",
            )
            for i in range(num_layers)
        ]
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="norm"
        )

        # === Functional Model ===
        image_input = keras.Input(shape=image_shape, name="images")
        x = self.embedding(image_input)
        for index, block in enumerate(self.transformer_layers):
            if ensemble_size > 1 and index == moe_indices[0]:
                # E^3: the members' copies of an image are consecutive.
                x = ops.repeat(x, ensemble_size, axis=0)
            x = block(x)
        outputs = self.norm(x)
        super().__init__(
            inputs=image_input, outputs=outputs, dtype=dtype, **kwargs
        )

        # === Config ===
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.num_register_tokens = num_register_tokens
        self.position_embedding_shape = position_shape
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.activation = activation
        self.moe_layers = moe_layers
        self.ensemble_size = ensemble_size
        self.moe_layer_indices = moe_indices
        moe_arguments.set_attributes(self, moe_values)

    @property
    def num_prefix_tokens(self):
        """CLS plus register tokens, before the patch tokens."""
        return 1 + self.num_register_tokens

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a backbone from a preset name, a directory or a hub handle.

        Args:
            preset: a name from `keras_vmoe.models.list_presets()` (the
                architecture is built from the table; with `load_weights`
                the dense checkpoint it names is downloaded, converted and
                upcycled; for a published V-MoE / E^3 checkpoint
                (`keras_vmoe.models.vit_moe.vmoe_presets`) the trained
                model's backbone, see `build_vmoe_preset`), a local KerasHub
                preset directory, or a KerasHub handle ("hf://...",
                "kaggle://...").
            load_weights: load pretrained weights.
            **kwargs: for a preset name, `weights_path` (a local dense
                `.safetensors` checkpoint to use instead of the download),
                `upcycle_noise_std`, `upcycle_seed`, and any constructor
                argument to override (e.g. `image_shape`, `dtype`, `normalize_gates`);
                otherwise passed to KerasHub.
        """
        if isinstance(preset, str) and (
            preset in presets.PRESETS or preset in VMOE_PRESETS
        ):
            return registry.build_preset(cls, preset, load_weights, **kwargs)
        preset_io.check_preset_name(preset, "ViTMoE", cls.__name__)
        preset_io.check_preset_dir(preset, False, load_weights, **kwargs)
        return preset_io._wrap_loading_errors(
            preset,
            lambda: super(ViTMoEBackbone, cls).from_preset(
                preset, load_weights=load_weights, **kwargs
            ),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": self.image_shape,
                "patch_size": self.patch_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "mlp_dim": self.mlp_dim,
                "num_register_tokens": self.num_register_tokens,
                "position_embedding_shape": self.position_embedding_shape,
                "layer_scale_init_value": self.layer_scale_init_value,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "activation": self.activation,
                "moe_layers": self.moe_layers,
                "ensemble_size": self.ensemble_size,
                **moe_arguments.get_config(self),
            }
        )
        return config


def _with_ensemble(moe_config, ensemble_size, moe_indices, router_type):
    """`moe_config` with `ensemble_size` when it is > 1, checked."""
    check_int("ensemble_size", ensemble_size)
    if ensemble_size == 1:
        return moe_config
    if router_type != "top_k" or not moe_indices:
        raise ValueError(
            "`ensemble_size` > 1 (E^3 ensemble routing) needs top-k MoE "
            "blocks: router_type='top_k' and `moe_layers`. Received: "
            f"ensemble_size={ensemble_size}, router_type={router_type!r}, "
            f"MoE blocks {list(moe_indices)}"
        )
    config = dict(moe_config, ensemble_size=ensemble_size)
    # The layer's own error names the argument (routing, top_k, ...).
    build_moe_layer(config, hidden_dim=1, name="moe_argument_check")
    return config
