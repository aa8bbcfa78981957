"""The NumPy adapter: the portable functions, and a stable argsort.

`keras.ops.argsort` runs NumPy's default quicksort, which does not keep
equal elements in index order; `stable_argsort` asks for a stable sort.
"""

import numpy as np

from keras_vmoe.layers.backends import BackendAdapter


class NumpyAdapter(BackendAdapter):
    def stable_argsort(self, x, axis=-1):
        return np.argsort(np.asarray(x), axis=axis, kind="stable").astype(
            "int32"
        )
