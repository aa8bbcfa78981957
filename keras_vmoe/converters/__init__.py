"""Checkpoint converters (timm, DINOv2, keras.applications, vmoe) and
upcycling."""

from keras_vmoe.converters.common import WeightAssigner
from keras_vmoe.converters.common import load_state_dict
from keras_vmoe.converters.upcycle import upcycle_feed_forward
from keras_vmoe.converters.convnext import convert_keras_applications_weights
from keras_vmoe.converters.convnext import convert_timm_weights
from keras_vmoe.converters.convnext import keras_applications_backbone_config
from keras_vmoe.converters.convnext import timm_backbone_config
from keras_vmoe.converters.convnext import upcycle_convnext
from keras_vmoe.converters.vit import convert_vit_checkpoint
from keras_vmoe.converters.vit import load_vit_checkpoint
from keras_vmoe.converters.vit import upcycle_vit
from keras_vmoe.converters.vmoe import build_vmoe_model
from keras_vmoe.converters.vmoe import convert_vmoe_checkpoint
from keras_vmoe.converters.vmoe import load_vmoe_params
from keras_vmoe.converters.vmoe import vmoe_model_kwargs
from keras_vmoe.converters.vmoe_format import read_vmoe_checkpoint
from keras_vmoe.converters.vmoe_format import read_vmoe_index
