"""What the MoE layers ask of the active `keras.distribution`.

The MoE layers place their dispatch buffers through
`dispatch_constraint(layer)`; the distribution that wants them placed
(`keras_vmoe.distribution.ExpertParallel`) answers through its own
`dispatch_constraint` method. The layers so never import
`keras_vmoe.distribution`, which finds the MoE layers of a model (it
imports the layers).
"""

import keras


def dispatch_constraint(layer):
    """The `constrain(tensor, name)` hook of the active distribution for
    `layer`'s dispatch buffers, or None (no distribution, or one that does
    not place them: anything but an `ExpertParallel`)."""
    distribution = keras.distribution.distribution()
    hook = getattr(distribution, "dispatch_constraint", None)
    if hook is None:
        return None
    return hook(layer)
