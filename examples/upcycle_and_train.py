"""Upcycle a dense DINOv2 / timm ViT or ConvNeXt checkpoint into an MoE
model, check that nothing changed, then train it.

Sparse upcycling copies each dense FFN into every expert (and the shared
expert). With renormalised top-k gates and no dropped tokens the MoE model
computes exactly the dense one, so training starts from the dense accuracy.

    # ViMoE from DINOv2 ViT-S/14 (downloads the checkpoint, or --checkpoint)
    python examples/upcycle_and_train.py --family vit \
        --preset vimoe_small_patch14_e8_last2_shared --epochs 3
    # MoE-ConvNeXt from a timm convnext_* .safetensors file
    python examples/upcycle_and_train.py --family convnext \
        --checkpoint convnext_tiny.safetensors --epochs 3
    python examples/upcycle_and_train.py --smoke     # tiny local checkpoints

The data is the embedded MNIST (resized); swap in `tf_data.tfds_dataset`
for your own.
"""

import argparse
import os

import keras
import numpy as np

from keras_vmoe.converters.convnext import convert_timm_weights
from keras_vmoe.converters.convnext import timm_backbone_config
from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.models import preset_normalization
from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.training import create_optimizer
from keras_vmoe.training import load_mnist
from keras_vmoe.training import tf_data

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "fixtures")
# The tiny timm ViT of tests/fixtures (make_vit_fixtures.py).
SMOKE_VIT = dict(
    image_shape=(56, 56, 3), patch_size=14, num_layers=4, num_heads=2,
    hidden_dim=32, mlp_dim=128, position_embedding_shape=(56, 56),
    layer_scale_init_value=1e-5,
)


def assert_trained(model):
    """A run that trained nothing fails (e.g. no full training batch)."""
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if steps < 1:
        raise RuntimeError("No training step ran: the training set gave no "
                           "full batch.")
    print(f"trained {steps} steps")


def build_vit(args, num_classes, moe):
    overrides = dict(SMOKE_VIT) if args.smoke else {}
    if not moe:
        overrides["moe_layers"] = None
    overrides["normalize_gates"] = True  # exact upcycling parity
    return ViTMoEImageClassifier.from_preset(
        args.preset, load_weights=True, weights_path=args.checkpoint,
        num_classes=num_classes, **overrides,
    )


def build_convnext(args, num_classes, moe):
    config = timm_backbone_config(args.checkpoint)
    moe_arguments = dict(
        moe_layers="last-2", num_experts=4, normalize_gates=True,
        eval_capacity_factor=None,
    ) if moe else {}
    backbone = ConvNeXtMoEBackbone(image_shape=(args.image_size, args.image_size, 3), **config, **moe_arguments)
    model = ConvNeXtMoEImageClassifier(backbone, num_classes=num_classes)
    backbone_only = keras.Model(backbone.inputs, backbone.outputs)
    convert_timm_weights(args.checkpoint, backbone)
    return model, backbone_only


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["vit", "convnext"], default="vit")
    parser.add_argument("--preset", default="vimoe_small_patch14_e8_last2_shared")
    parser.add_argument("--checkpoint", default=None, help="dense .safetensors")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.max_examples = 1, 16, 64
        if args.family == "vit":
            args.checkpoint = os.path.join(FIXTURES, "vit_tiny_dinov2.safetensors")
            args.image_size = 56
        else:
            args.checkpoint = os.path.join(FIXTURES, "convnext_tiny_random.safetensors")
            args.image_size = 32
    if args.family == "convnext" and not args.checkpoint:
        parser.error("--family convnext needs --checkpoint (a timm convnext_*.safetensors)")

    num_classes = 10
    images = np.random.default_rng(0).uniform(0, 255, (4, args.image_size, args.image_size, 3))
    if args.family == "vit":
        dense = build_vit(args, num_classes, moe=False).backbone
        model = build_vit(args, num_classes, moe=True)
        moe_features = model.backbone
    else:
        _, dense = build_convnext(args, num_classes, moe=False)
        model, moe_features = build_convnext(args, num_classes, moe=True)
    gap = np.abs(
        keras.ops.convert_to_numpy(moe_features(images))
        - keras.ops.convert_to_numpy(dense(images))
    ).max()
    print(f"upcycled vs dense features: max |difference| = {gap:.2e}")

    (x_train, y_train), (x_test, y_test) = load_mnist()
    n = args.max_examples
    common = dict(image_size=args.image_size, batch_size=args.batch_size,
                  num_classes=num_classes, crop_fraction=1.0,
                  # The statistics of the checkpoint (0.5 / 0.5 for timm AugReg ViTs).
                  normalize=(preset_normalization(args.preset)
                             if args.family == "vit" else "imagenet"))
    train = tf_data.array_dataset(x_train[:n], y_train[:n], training=True, **common)
    test = tf_data.array_dataset(x_test[:n], y_test[:n], training=False, **common)
    model.preprocessor = None  # the pipeline normalises
    steps = max(1, int(train.cardinality())) * args.epochs
    model.compile(
        optimizer=create_optimizer(model, total_steps=steps, learning_rate=1e-4,
                                   layer_decay=0.65 if args.family == "vit" else 1.0),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    model.fit(train, validation_data=test, epochs=args.epochs, shuffle=False)
    assert_trained(model)
    return gap


if __name__ == "__main__":
    main()
