"""Routing at inference on a built model.

Every MoE layer of keras-vmoe routes each image on its own at inference by
default (`eval_group_size="image"`), so `predict`, `evaluate` and an
exported model give an image the same output whatever else is in the
batch. `set_eval_group_size` changes that on a model that is already built
or loaded, e.g. to reproduce an evaluation protocol that routed groups of
several images together (batch-level capacity).
"""

from keras_vmoe.layers.moe_types import find_moe_layers
from keras_vmoe.layers.routing import check_group_size


def set_eval_group_size(model, eval_group_size):
    """Sets the routing groups at inference of every MoE layer of `model`.

    Args:
        model: a keras-vmoe backbone or classifier (or any Keras model or
            layer holding MoE layers).
        eval_group_size: "image" (every image its own routing group: batch
            independent), None (the whole batch is one group) or a positive
            int (items per group: tokens for token routing, images for
            image routing), as the layers' `eval_group_size`.

    The backbone's config (and so a saved preset) records the new value.
    Compiled `predict` / `evaluate` functions are reset so that the next
    call traces the new routing.

    Raises:
        ValueError: for an invalid `eval_group_size`, or a model without a
            MoE layer that takes it (Soft MoE always routes per image).
    """
    check_group_size("eval_group_size", eval_group_size)
    layers = [
        layer
        for layer in find_moe_layers(model)
        if hasattr(layer, "eval_group_size")
    ]
    if not layers:
        raise ValueError(
            "`set_eval_group_size` found no MoE layer with routing groups "
            f"in {type(model).__name__} {getattr(model, 'name', '')!r} (Soft "
            "MoE layers always route every image on its own)."
        )
    for layer in layers:
        ensemble = getattr(layer, "ensemble_size", 1)
        if isinstance(eval_group_size, int) and eval_group_size % ensemble:
            raise ValueError(
                "`eval_group_size` must be a multiple of `ensemble_size` "
                f"({ensemble}) of layer {layer.name!r}. Received: "
                f"eval_group_size={eval_group_size}"
            )
    for layer in layers:
        layer.eval_group_size = eval_group_size
    for owner in (model, getattr(model, "backbone", None)):
        if owner is None:
            continue
        if hasattr(owner, "eval_group_size"):
            owner.eval_group_size = eval_group_size
        for name in ("predict_function", "test_function"):
            if getattr(owner, name, None) is not None:
                setattr(owner, name, None)
    return model
