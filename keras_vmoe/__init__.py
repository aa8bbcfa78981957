"""keras-vmoe: the Keras 3 model zoo for vision Mixture-of-Experts."""

from keras_vmoe import layers

__version__ = "0.1.0"
