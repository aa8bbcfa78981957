"""Collect the routing decisions of every MoE layer of a model over data.

Routing is read through `add_routing_observer`, the layers' public hook
(on `MoEFeedForward`, `SoftMoEFeedForward` and `ExpertChoiceFeedForward`),
while the model runs eagerly in inference mode; nothing about the model
changes. Top-k layers give a `LayerRouting`; Soft MoE layers a
`SoftLayerRouting` and Expert Choice layers an `ExpertChoiceLayerRouting`,
which hold the statistics that make sense for their routing (there is no
per-item expert choice to plot as a heatmap or gating map).

Axis letters (see docs/glossary.md): N images (collected over all
batches) · T tokens per image · H, W feature-map or patch grid · K experts
per item · E experts; the number of classes is `num_classes`.
"""

import dataclasses
import math

import keras
import numpy as np

from keras_vmoe.analysis import statistics
from keras_vmoe.analysis.statistics import to_numpy
from keras_vmoe.layers.moe_types import find_moe_layers

# What the report skips for Soft MoE and Expert Choice layers, and why.
TOP_K_ONLY_NOTE = (
    "skipped for this router: class x expert heatmaps, specialization, "
    "gating maps, expert similarity, patches-per-expert CDF and the "
    "routing degree need each item's top-k expert choices"
)


@dataclasses.dataclass
class LayerRouting:
    """The routing decisions of one MoE layer over a dataset.

    Attributes:
        name: the layer's path in the model (e.g. ".../block_11/mlp").
        index: position of the layer among the model's MoE layers in the
            order they run, 0 for the shallowest.
        num_experts: E.
        top_k: K.
        routing: "token" or "image".
        expert_index: int array [N, K] (image routing) or [N, T, K] /
            [N, H, W, K] (token routing).
        gates: float array like `expert_index`, 0 where dropped.
        dropped: bool array like `expert_index`.
        router_probs: float array [..., E], the softmax router outputs.
        labels: int array [N], or None when the data has no labels.
        num_classes: number of classes (labels' max + 1, or the model's
            output width).
        num_prefix_tokens: tokens before the patches (CLS and registers)
            for [N, T, K] token routing; 0 otherwise.
        fit_statistics: `{name: float}`, the layer's `routing_statistics()`
            (the values `fit` logs) of every batch collected, averaged
            with the batches' image counts as weights.
    """

    name: str
    index: int
    num_experts: int
    top_k: int
    routing: str
    expert_index: np.ndarray
    gates: np.ndarray
    dropped: np.ndarray
    router_probs: np.ndarray
    labels: np.ndarray = None
    num_classes: int = None
    num_prefix_tokens: int = 0
    fit_statistics: dict = None

    kind = "top_k"

    @property
    def num_images(self):
        return self.expert_index.shape[0]

    @property
    def load(self):
        """[E] fraction of the kept choices each expert processed."""
        return statistics.expert_load(
            self.expert_index, self.num_experts, self.dropped
        )

    @property
    def importance(self):
        """[E] mean router probability of each expert."""
        return statistics.expert_importance(self.router_probs)

    @property
    def dropped_fraction(self):
        return statistics.dropped_fraction(self.dropped)

    @property
    def gate_entropy(self):
        return statistics.gate_entropy(self.router_probs)

    @property
    def mean_gate(self):
        """[E] mean gate mass each expert gets per item (0 where dropped).

        Summed over experts it is the mean total gate of an item: 1 with
        renormalised gates and no drops.
        """
        gates = self.gates.reshape(-1, self.top_k).astype("float64")
        index = self.expert_index.reshape(-1, self.top_k)
        mass = np.zeros((self.num_experts,))
        np.add.at(mass, index.ravel(), gates.ravel())
        return mass / max(index.shape[0], 1)

    @property
    def class_expert_counts(self):
        """[num_classes, E] routing heatmap table, or None without labels."""
        if self.labels is None:
            return None
        return statistics.class_expert_counts(
            self.labels, self.expert_index, self.num_classes, self.num_experts
        )

    @property
    def specialization(self):
        """`statistics.specialization_score` of the layer (NMI normalised
        by min(H(c), H(e))), None without labels."""
        counts = self.class_expert_counts
        return (
            None if counts is None else statistics.specialization_score(counts)
        )

    @property
    def specialization_arithmetic(self):
        """The NMI normalised by the arithmetic mean (H(c) + H(e)) / 2
        (scikit-learn's default), None without labels."""
        counts = self.class_expert_counts
        return (
            None
            if counts is None
            else statistics.specialization_score(
                counts, normalization="arithmetic"
            )
        )

    @property
    def patch_expert_index(self):
        """Token routing: [N, K, ...] choices of the patch tokens only
        (prefix tokens removed); image routing: `expert_index`."""
        if self.routing == "image" or self.expert_index.ndim == 4:
            return self.expert_index
        return self.expert_index[:, self.num_prefix_tokens :]

    @property
    def expert_counts(self):
        """[N, E] routing choices of each image's patches per expert."""
        return statistics.expert_counts_per_image(
            self.patch_expert_index, self.num_experts
        )

    def top_expert_map(self, image_shape):
        """[N, rows, columns] top-1 expert of every patch (token routing).

        Args:
            image_shape: (height, width) of the input images, used to lay
                a ViT's patch tokens out on their grid.

        Returns:
            int array; for image routing every patch of an image shows the
            image's expert.
        """
        if self.routing == "image":
            return self.expert_index[:, 0, None, None]
        patches = self.patch_expert_index[..., 0]
        if patches.ndim == 3:
            return patches
        num_patches = patches.shape[1]
        height, width = image_shape
        rows = max(1, round(math.sqrt(num_patches * height / width)))
        if num_patches % rows:
            raise ValueError(
                f"Cannot lay {num_patches} patch tokens out on a grid for "
                f"images of image_shape={tuple(image_shape)}"
            )
        return patches.reshape(patches.shape[0], rows, num_patches // rows)

    def summary(self):
        """The layer's statistics as JSON-ready numbers."""
        counts = self.expert_counts
        return {
            "name": self.name,
            "index": self.index,
            "routing": self.routing,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "load": self.load.tolist(),
            "importance": self.importance.tolist(),
            "mean_gate": self.mean_gate.tolist(),
            "dropped_fraction": self.dropped_fraction,
            "gate_entropy": self.gate_entropy,
            "specialization": self.specialization,
            "specialization_normalization": "min",
            "specialization_arithmetic": self.specialization_arithmetic,
            "experts_per_image": float((counts > 0).sum(axis=1).mean()),
            "class_expert_counts": (
                None
                if self.labels is None
                else self.class_expert_counts.tolist()
            ),
            "expert_similarity_images": statistics.expert_similarity(
                counts, by="images"
            ).tolist(),
            "expert_similarity_patches": statistics.expert_similarity(
                counts, by="patches"
            ).tolist(),
            "expert_similarity_sweetspot": statistics.sweetspot_similarity(
                counts
            ).tolist(),
        }

@dataclasses.dataclass
class SoftLayerRouting:
    """The routing of one `SoftMoEFeedForward` layer over a dataset.

    Soft MoE has no discrete choice: every slot mixes all tokens of its
    image (dispatch weights, softmax over tokens) and every token mixes all
    slots (combine weights, softmax over slots). Per-image reductions are
    kept, not the [N, T, E, S] weights.

    Attributes:
        name, index, num_experts, fit_statistics: as `LayerRouting`.
        slots_per_expert: S.
        num_tokens: T, tokens (positions) per image.
        slot_entropy: [N, E] entropy (nats) of the expert's slots'
            dispatch distributions, averaged over its C slots; log(T) is a
            uniform mix of all tokens, 0 a single token.
        dispatch_max: [N, E] largest dispatch weight of the expert's slots
            (averaged over its C slots).
        combine_mass: [N, E] share of the image's combine weights that
            goes to the expert's slots (sums to 1 over E).
        combine_entropy: [N] mean entropy (nats) of the tokens' combine
            distributions; log(E*C) is uniform.
        combine_max: [N] mean largest combine weight of a token.
    """

    name: str
    index: int
    num_experts: int
    slots_per_expert: int
    num_tokens: int
    slot_entropy: np.ndarray
    dispatch_max: np.ndarray
    combine_mass: np.ndarray
    combine_entropy: np.ndarray
    combine_max: np.ndarray
    routing: str = "soft"
    fit_statistics: dict = None
    kind = "soft"

    @property
    def num_images(self):
        return self.combine_mass.shape[0]

    @property
    def load(self):
        """[E] share of all combine weights each expert receives."""
        return self.combine_mass.mean(axis=0)

    @property
    def expert_slot_entropy(self):
        """[E] mean slot entropy (nats) of each expert."""
        return self.slot_entropy.mean(axis=0)

    def summary(self):
        num_slots = self.num_experts * self.slots_per_expert
        return {
            "name": self.name,
            "index": self.index,
            "routing": self.routing,
            "num_experts": self.num_experts,
            "slots_per_expert": self.slots_per_expert,
            "load": self.load.tolist(),
            "slot_entropy": self.expert_slot_entropy.tolist(),
            "slot_entropy_uniform": math.log(self.num_tokens),
            "dispatch_weights_max": self.dispatch_max.mean(axis=0).tolist(),
            "dispatch_weights_uniform": 1.0 / self.num_tokens,
            "combine_entropy": float(self.combine_entropy.mean()),
            "combine_entropy_uniform": math.log(num_slots),
            "combine_weights_max": float(self.combine_max.mean()),
            "skipped": TOP_K_ONLY_NOTE,
        }


@dataclasses.dataclass
class ExpertChoiceLayerRouting:
    """The routing of one `ExpertChoiceFeedForward` layer over a dataset.

    Every expert picks its top-C tokens of each routing group, so a token
    gets 0..E experts and every expert processes the same number of tokens
    per group.

    Attributes:
        name, index, num_experts, fit_statistics: as `LayerRouting`.
        tokens_per_expert: [N, E] tokens of each image each expert chose.
        experts_per_token: int array [N, T] (or [N, H, W]): how many
            experts chose each token.
        router_probs: float array [N, ..., E] of router probabilities.
        gates: float array [N, ..., E], 0 where the expert did not choose
            the token.
    """

    name: str
    index: int
    num_experts: int
    tokens_per_expert: np.ndarray
    experts_per_token: np.ndarray
    router_probs: np.ndarray
    gates: np.ndarray
    routing: str = "expert_choice"
    fit_statistics: dict = None
    kind = "expert_choice"

    @property
    def num_images(self):
        return self.tokens_per_expert.shape[0]

    @property
    def load(self):
        """[E] share of all chosen (token, expert) pairs per expert."""
        totals = self.tokens_per_expert.sum(axis=0).astype("float64")
        return totals / max(totals.sum(), 1.0)

    @property
    def importance(self):
        """[E] mean router probability of each expert."""
        return statistics.expert_importance(self.router_probs)

    @property
    def unrouted_fraction(self):
        """Share of the tokens that no expert chose."""
        return float((self.experts_per_token == 0).mean())

    def summary(self):
        counts = np.bincount(
            self.experts_per_token.ravel(), minlength=self.num_experts + 1
        )
        return {
            "name": self.name,
            "index": self.index,
            "routing": self.routing,
            "num_experts": self.num_experts,
            "load": self.load.tolist(),
            "tokens_per_expert": self.tokens_per_expert.sum(axis=0).tolist(),
            "tokens_per_expert_per_image": (
                self.tokens_per_expert.mean(axis=0).tolist()
            ),
            "importance": self.importance.tolist(),
            "unrouted_fraction": self.unrouted_fraction,
            "experts_per_token_mean": float(self.experts_per_token.mean()),
            "experts_per_token_histogram": (
                (counts / max(counts.sum(), 1)).tolist()
            ),
            "gate_entropy": statistics.gate_entropy(self.router_probs),
            "skipped": TOP_K_ONLY_NOTE,
        }


def _soft_record(routing, num_experts):
    """Per-image reductions of a Soft MoE layer's routing dict."""
    dispatch = keras.ops.convert_to_numpy(routing["dispatch_weights"])
    combine = keras.ops.convert_to_numpy(routing["combine_weights"])
    num_images, num_slots = dispatch.shape[0], dispatch.shape[-1]
    dispatch = dispatch.reshape(num_images, -1, num_experts, num_slots)
    combine = combine.reshape(num_images, -1, num_experts * num_slots)
    plogp = dispatch * np.log(np.maximum(dispatch, 1e-30))
    combine_plogp = combine * np.log(np.maximum(combine, 1e-30))
    return {
        "slot_entropy": -plogp.sum(axis=1).mean(axis=-1),
        "dispatch_max": dispatch.max(axis=1).mean(axis=-1),
        "combine_mass": combine.reshape(
            num_images, -1, num_experts, num_slots
        )
        .sum(axis=-1)
        .mean(axis=1),
        "combine_entropy": -combine_plogp.sum(axis=-1).mean(axis=-1),
        "combine_max": combine.max(axis=-1).mean(axis=-1),
        "num_tokens": np.full((num_images,), dispatch.shape[1]),
    }


def _expert_choice_record(routing, num_experts):
    """Per-image arrays of an Expert Choice layer's routing dict."""
    gates = keras.ops.convert_to_numpy(routing["gates"])
    chosen = (gates > 0).reshape(gates.shape[0], -1, num_experts)
    return {
        "tokens_per_expert": chosen.sum(axis=1),
        "experts_per_token": keras.ops.convert_to_numpy(
            routing["experts_per_token"]
        ),
        "router_probs": keras.ops.convert_to_numpy(routing["router_probs"]),
        "gates": gates,
    }


@dataclasses.dataclass
class RoutingResult:
    """Routing of every MoE layer of a model over a dataset.

    Attributes:
        layers: list of `LayerRouting` (top-k layers),
            `SoftLayerRouting` and `ExpertChoiceLayerRouting`, shallowest
            first.
        images: float array [N, H, W, C] of the inputs (kept for gating
            maps), or None when `keep_images=False`.
        labels: int array [N] or None.
        image_shape: (height, width) of the inputs.
    """

    layers: list
    images: np.ndarray
    labels: np.ndarray
    image_shape: tuple

    @property
    def num_images(self):
        return self.layers[0].num_images

    @property
    def top_k_layers(self):
        """The `LayerRouting`s of the top-k (`MoEFeedForward`) layers."""
        return [r for r in self.layers if r.kind == "top_k"]

    def layer(self, index):
        """The `LayerRouting` of MoE layer `index` (int, negative counts
        from the deepest) or of the layer with that name."""
        return self.layers[
            _resolve_layer_index(index, [r.name for r in self.layers])
        ]

    @property
    def routing_degree(self):
        """D = binom(E, K)^L over the image-routed layers (ViMoE), or None."""
        image_layers = [r for r in self.layers if r.routing == "image"]
        if not image_layers:
            return None
        return math.prod(
            math.comb(r.num_experts, r.top_k) for r in image_layers
        )

    @property
    def distinct_routes(self):
        """Observed distinct routes of images through the image-routed
        layers, or None when no layer routes images."""
        choices = [r.expert_index for r in self.layers if r.routing == "image"]
        return statistics.distinct_routes(choices) if choices else None

    def specialization_ranking(self):
        """Layer names sorted from least to most specialised (needs
        labels)."""
        scores = {r.name: r.specialization for r in self.top_k_layers}
        if any(score is None for score in scores.values()):
            raise ValueError(
                "Specialization scores need labelled data. Received data "
                "without labels."
            )
        return sorted(scores, key=scores.get)

    def summary(self):
        """All numbers as a JSON-ready dict."""
        return {
            "num_images": self.num_images,
            "routing_degree": self.routing_degree,
            "distinct_routes": self.distinct_routes,
            "layers": [r.summary() for r in self.layers],
        }


def _fold_ensemble(arrays, members):
    """An E^3 layer's routing of B*M rows (copies of an image consecutive)
    as B images: every member's K choices become choices of the image's
    token ([B, T, M*K]), and the router probabilities are the members'
    mean ([B, T, E]: member m's probabilities / M on its experts)."""
    folded = {}
    for field, value in arrays.items():
        value = value.reshape((-1, members) + value.shape[1:])
        if field == "router_probs":
            folded[field] = value.mean(axis=1)
            continue
        value = np.moveaxis(value, 1, -2)  # [B, ..., M, K]
        folded[field] = value.reshape(value.shape[:-2] + (-1,))
    return folded


def _resolve_layer_index(index, names):
    if isinstance(index, str):
        if index not in names:
            raise ValueError(
                f"`layers` names must be MoE layers of the model {names}. "
                f"Received: {index!r}"
            )
        return names.index(index)
    if (
        not isinstance(index, int)
        or isinstance(index, bool)
        or not -len(names) <= index < len(names)
    ):
        raise ValueError(
            f"MoE layer index out of range: the model has {len(names)} MoE "
            f"layers (indices 0..{len(names) - 1}). Received: {index!r}"
        )
    return index % len(names)


def _batches(data, batch_size):
    """Yields (images, labels or None) numpy batches from arrays or an
    iterable of batches (e.g. a `tf.data.Dataset`)."""
    if isinstance(data, np.ndarray):
        data = (data, None)
    if isinstance(data, tuple) and isinstance(data[0], np.ndarray):
        images, labels = data[0], data[1]
        if labels is not None and len(labels) != len(images):
            raise ValueError(
                "`data` images and labels must have the same length. "
                f"Received: {len(images)} images, {len(labels)} labels"
            )
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            yield images[start:stop], (
                None if labels is None else to_numpy(labels[start:stop])
            )
        return
    for batch in data:
        if isinstance(batch, (tuple, list)):
            images = batch[0]
            labels = batch[1] if len(batch) > 1 else None
        else:
            images, labels = batch, None
        yield (
            keras.ops.convert_to_numpy(images),
            None if labels is None else keras.ops.convert_to_numpy(labels),
        )


def model_inputs(model, images):
    """Images as the model's layers expect them.

    A KerasHub task applies its preprocessor (resize, normalisation) in
    `fit` / `predict` / `evaluate`, not in `__call__`; analysis calls the
    model directly, so it applies the preprocessor itself.
    """
    preprocessor = getattr(model, "preprocessor", None)
    return images if preprocessor is None else preprocessor(images)


def _num_prefix_tokens(model):
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "num_prefix_tokens", 0)


def collect_routing(
    model,
    data,
    max_batches=None,
    batch_size=32,
    num_classes=None,
    keep_images=True,
):
    """Runs `model` over `data` and records the routing of its MoE layers.

    Args:
        model: any Keras model containing MoE layers (`MoEFeedForward`,
            `SoftMoEFeedForward`, `ExpertChoiceFeedForward`; a keras-vmoe
            backbone or classifier).
        data: a numpy array of images [N, H, W, C], a tuple `(images,
            labels)` of numpy arrays, or an iterable of batches `images`
            or `(images, labels)` such as a `tf.data.Dataset`. Labels are
            int class ids (one-hot labels are turned into ids).
        max_batches: stop after this many batches (None: all).
        batch_size: batch size for numpy inputs.
        num_classes: number of classes of the labels; default: the
            model's output width for a [B, classes] output, else
            `max(labels) + 1`. A label outside `[0, num_classes)` raises
            (it is never widened).
        keep_images: keep the input images in the result (for gating
            maps).

    Returns:
        A `RoutingResult`.

    Raises:
        ValueError: when the model has no MoE layer, the data yields no
            image, or an argument is invalid.

    Example:
    >>> result = collect_routing(classifier, (images, labels), max_batches=4)
    >>> result.layers[-1].specialization
    """
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(
            "`model` has no MoE layer (MoEFeedForward, SoftMoEFeedForward "
            "or ExpertChoiceFeedForward) to analyse. Received: "
            f"model={model.name!r}"
        )
    if max_batches is not None and (
        not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(
            "`max_batches` must be a positive integer or None. Received: "
            f"max_batches={max_batches!r}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: "
            f"batch_size={batch_size!r}"
        )
    if num_classes is not None and (
        not isinstance(num_classes, int)
        or isinstance(num_classes, bool)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive integer or None. Received: "
            f"num_classes={num_classes!r}"
        )
    fields = ("expert_index", "gates", "dropped", "router_probs")
    records = {id(layer): {} for layer in layers}
    batch_statistics = {id(layer): {} for layer in layers}
    batch_sizes = []

    call_order = []

    def observe(layer, routing):
        if id(layer) not in call_order:
            call_order.append(id(layer))
        if layer.router_type == "soft":
            arrays = _soft_record(routing, layer.num_experts)
        elif layer.router_type == "expert_choice":
            arrays = _expert_choice_record(routing, layer.num_experts)
        else:
            arrays = {
                field: keras.ops.convert_to_numpy(routing[field])
                for field in fields
            }
            members = getattr(layer, "ensemble_size", 1)
            if members > 1:
                arrays = _fold_ensemble(arrays, members)
        for field, value in arrays.items():
            records[id(layer)].setdefault(field, []).append(value)
        for name, value in layer.routing_statistics().items():
            batch_statistics[id(layer)].setdefault(name, []).append(
                float(keras.ops.convert_to_numpy(value))
            )

    for layer in layers:
        layer.add_routing_observer(observe)
    images, labels, outputs_width, image_shape = [], [], None, None
    try:
        for step, (batch_images, batch_labels) in enumerate(
            _batches(data, batch_size)
        ):
            if max_batches is not None and step >= max_batches:
                break
            if not len(batch_images):
                continue
            outputs = keras.tree.flatten(
                model(model_inputs(model, batch_images), training=False)
            )
            batch_sizes.append(len(batch_images))
            if len(outputs[0].shape) == 2:
                outputs_width = outputs[0].shape[-1]
            image_shape = tuple(batch_images.shape[1:3])
            if keep_images:
                images.append(to_numpy(batch_images))
            if batch_labels is not None:
                if batch_labels.ndim == 2:
                    batch_labels = batch_labels.argmax(axis=-1)
                labels.append(batch_labels.astype("int64").ravel())
    finally:
        for layer in layers:
            layer.remove_routing_observer(observe)
    if not records[id(layers[0])]:
        raise ValueError(
            "`data` yielded no image to analyse. Received: an empty "
            f"{type(data).__name__}"
        )
    labels = np.concatenate(labels) if labels else None
    if labels is not None:
        source = "num_classes"
        if num_classes is None and outputs_width:
            num_classes, source = outputs_width, "the model's output width"
        elif num_classes is None:
            num_classes, source = int(labels.max()) + 1, "max(labels) + 1"
        outside = (labels < 0) | (labels >= num_classes)
        if outside.any():
            # Never widen num_classes past the model's classes: a label
            # outside them is a data error.
            raise ValueError(
                f"`data` has labels outside [0, {num_classes}) "
                f"(num_classes={num_classes}, from {source}). Received: "
                f"a label {int(labels[outside][0])} in labels (range "
                f"[{int(labels.min())}, {int(labels.max())}])"
            )
    prefix = _num_prefix_tokens(model)
    # Shallowest first: the order in which the layers ran.
    layers = sorted(layers, key=lambda layer: call_order.index(id(layer)))
    results = []
    for index, layer in enumerate(layers):
        arrays = {
            field: np.concatenate(values, axis=0)
            for field, values in records[id(layer)].items()
        }
        common = dict(
            name=layer.path,
            index=index,
            num_experts=layer.num_experts,
            fit_statistics={
                name: float(np.average(values, weights=batch_sizes))
                for name, values in batch_statistics[id(layer)].items()
            },
        )
        if layer.router_type == "soft":
            num_tokens = int(arrays.pop("num_tokens")[0])
            results.append(
                SoftLayerRouting(
                    slots_per_expert=layer.slots_per_expert,
                    num_tokens=num_tokens,
                    **common,
                    **arrays,
                )
            )
        elif layer.router_type == "expert_choice":
            results.append(ExpertChoiceLayerRouting(**common, **arrays))
        else:
            results.append(
                LayerRouting(
                    top_k=layer.top_k * getattr(layer, "ensemble_size", 1),
                    routing=layer.routing,
                    labels=labels,
                    num_classes=num_classes,
                    num_prefix_tokens=prefix,
                    **common,
                    **arrays,
                )
            )
    return RoutingResult(
        layers=results,
        images=np.concatenate(images, axis=0) if keep_images else None,
        labels=labels,
        image_shape=image_shape,
    )


def accuracy(model, data, batch_size=32, max_batches=None):
    """Top-1 accuracy of a classifier on labelled data.

    Args:
        model: a Keras model returning class scores [B, classes].
        data: `(images, labels)` numpy arrays or an iterable of
            `(images, labels)` batches.
        batch_size: batch size for numpy inputs.
        max_batches: stop after this many batches (None: all).

    Returns:
        float in [0, 1].

    Example:
    >>> accuracy(pruned, (images, labels)) - accuracy(model, (images, labels))
    """
    correct = total = 0
    for step, (images, labels) in enumerate(_batches(data, batch_size)):
        if max_batches is not None and step >= max_batches:
            break
        if labels is None:
            raise ValueError(
                "`accuracy` needs labelled data: `(images, labels)`. "
                "Received: a batch without labels"
            )
        if labels.ndim == 2:
            labels = labels.argmax(axis=-1)
        scores = keras.ops.convert_to_numpy(
            model(model_inputs(model, images), training=False)
        )
        correct += int((scores.argmax(axis=-1) == labels.ravel()).sum())
        total += len(labels)
    if not total:
        raise ValueError(
            "`data` yielded no image to evaluate. Received: an empty "
            f"{type(data).__name__}"
        )
    return correct / total
