"""Training: optimizer recipe, precision, data pipelines, routing metrics.

`keras_vmoe.training.tf_data` (pipelines, augmentation) imports TensorFlow
and `tensorflow_datasets`; it is imported on first use, so the rest of the
package works without them.
"""

from keras_vmoe.training.datasets import load_mnist
from keras_vmoe.training.metrics import RoutingMetricsMixin
from keras_vmoe.training.metrics import moe_layers
from keras_vmoe.training.metrics import routed_layers
from keras_vmoe.training.metrics import top_k_layers
from keras_vmoe.training.optimizer import LayerDecayAdamW
from keras_vmoe.training.optimizer import create_optimizer
from keras_vmoe.training.optimizer import layer_decay_multipliers
from keras_vmoe.training.optimizer import no_weight_decay_variables
from keras_vmoe.training.optimizer import set_precision
from keras_vmoe.training.optimizer import vmoe_finetune_optimizer
from keras_vmoe.training.optimizer import warmup_cosine_schedule
