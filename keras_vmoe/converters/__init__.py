"""Checkpoint converters (timm, DINOv2, keras.applications) and upcycling."""

from keras_vmoe.converters.common import WeightAssigner
from keras_vmoe.converters.common import load_state_dict
from keras_vmoe.converters.upcycle import upcycle_feed_forward
