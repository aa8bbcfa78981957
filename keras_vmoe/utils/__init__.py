"""Small shared utilities (atomic file and folder writes)."""

from keras_vmoe.utils.io import atomic_directory
from keras_vmoe.utils.io import atomic_file
from keras_vmoe.utils.io import replace_directory
