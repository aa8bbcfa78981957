"""`fit(x, y, shuffle=True)` on arrays that really shuffles (re-exported).

The code lives in `keras_vmoe.models.shuffle`, next to the models that mix
`ShuffledFitMixin` in (models never import `keras_vmoe.training`).
"""

from keras_vmoe.models.shuffle import ShuffledFitMixin
from keras_vmoe.models.shuffle import shuffled_array_dataset

__all__ = ["ShuffledFitMixin", "shuffled_array_dataset"]
