"""Inference (and training) speed of MoE models against their dense
baselines.

Usage:
    python benchmarks/models.py                  # TensorFlow (default)
    KERAS_BACKEND=jax python benchmarks/models.py
    python benchmarks/models.py --only "Soft MoE-S/16" --batch 8 --mode train

For each (name, dense builder, MoE builder, target) row of `PAIRS`, both
models run the same compiled forward pass (`--mode inference`, default) or
forward + backward step (`--mode train`: gradients of a squared-output
loss plus the MoE auxiliary losses) on the same batch (default 32 images
of 224x224), interleaved round-robin so machine-speed drift hits both
alike, and the script prints images/s and the MoE / dense speed ratio next
to its target. The targets are inference targets; in train mode they are
only a reference. Add a model family by appending a row.
"""

import argparse
import os
import sys

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import compiled_forward  # noqa: E402
from _timing import compiled_train_step  # noqa: E402
from _timing import interleaved_median_times  # noqa: E402
from _timing import random_inputs  # noqa: E402

from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone  # noqa: E402
from keras_vmoe.models.vit_moe import ViTMoEBackbone  # noqa: E402


def vit_preset(name):
    return lambda: ViTMoEBackbone.from_preset(name, load_weights=False)


def convnext_preset(name):
    return lambda: ConvNeXtMoEBackbone.from_preset(name, load_weights=False)


# (name, dense builder, MoE builder, target speed ratio MoE / dense)
PAIRS = [
    (
        "ViT-S/16 vs E8 Last-2 top-2 token",
        vit_preset("vit_small_patch16"),
        vit_preset("vit_moe_small_patch16_e8_last2_top2"),
        0.90,
    ),
    (
        "DINOv2 ViT-S/14 vs ViMoE N8 L2 shared",
        vit_preset("vit_small_patch14_dinov2"),
        vit_preset("vimoe_small_patch14_e8_last2_shared"),
        0.88,
    ),
    # Soft MoE paper, Table 8: ViT-S/16 0.5 ms/img, Soft MoE-S/16 0.7
    # ms/img (TPUv3): a 0.71x speed ratio. 922M parameters (3.7 GB).
    (
        "ViT-S/16 vs Soft MoE-S/16 128E",
        vit_preset("vit_small_patch16"),
        vit_preset("soft_moe_small_patch16_128e"),
        0.71,
    ),
    (
        "ViT-S/16 vs Expert Choice E8 Every-2 cf2",
        vit_preset("vit_small_patch16"),
        vit_preset("expert_choice_vit_small_patch16_e8_every2_cf2"),
        0.80,
    ),
    (
        "ConvNeXt-T vs E8 Last-2 top-1 token",
        convnext_preset("convnext_tiny"),
        convnext_preset("convnext_moe_tiny_e8_last2"),
        0.95,
    ),
    # 80 slots cost about the dense MLPs' MACs (4.51 vs 4.47 GMACs).
    (
        "ConvNeXt-T vs Soft MoE E8 x 10 slots Last-2",
        convnext_preset("convnext_tiny"),
        convnext_preset("convnext_soft_moe_tiny_e8_s10_last2_mlp4"),
        0.90,
    ),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--only", help="run the rows whose name contains this text"
    )
    parser.add_argument(
        "--mode",
        choices=("inference", "train"),
        default="inference",
        help="time the forward pass, or a forward + backward step",
    )
    args = parser.parse_args()
    compile_step = (
        compiled_forward if args.mode == "inference" else compiled_train_step
    )

    inputs = random_inputs((args.batch, args.image_size, args.image_size, 3))
    print(
        f"backend={keras.backend.backend()} batch={args.batch} "
        f"image={args.image_size} rounds={args.rounds} mode={args.mode}"
    )
    pairs = [row for row in PAIRS if not args.only or args.only in row[0]]
    functions = {}
    for name, build_dense, build_moe, _ in pairs:
        functions[(name, "dense")] = compile_step(build_dense())
        functions[(name, "moe")] = compile_step(build_moe())
    # All rows in one interleaved run: every ratio compares calls made at
    # the same time.
    times = interleaved_median_times(functions, inputs, rounds=args.rounds)
    for name, _, _, target in pairs:
        dense, moe = times[(name, "dense")], times[(name, "moe")]
        ratio = dense / moe
        verdict = "meets" if ratio >= target else "MISSES"
        print(
            f"{name}: dense {args.batch / dense:.1f} im/s, "
            f"MoE {args.batch / moe:.1f} im/s, ratio {ratio:.3f}x "
            f"({verdict} target {target:.2f}x)"
        )


if __name__ == "__main__":
    main()
