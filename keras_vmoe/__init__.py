"""keras-vmoe: the Keras 3 model zoo for vision Mixture-of-Experts.

Importing the package registers every layer and model class with Keras, so
`keras_hub.models.ImageClassifier.from_preset(folder)` and
`keras.saving.load_model(path)` can rebuild keras-vmoe models.
"""

from keras_vmoe import analysis
from keras_vmoe import distribution
from keras_vmoe import layers
from keras_vmoe import models

__version__ = "0.1.0"
