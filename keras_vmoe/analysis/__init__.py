"""Routing analysis and model surgery for keras-vmoe models.

Statistics (`collect_routing`, `statistics.*`), plots (`plots.*`), a
one-call report (`write_report`), and surgery (`prune_moe_layers`,
`merge_experts`, `DistillationModel`).
"""

from keras_vmoe.analysis import plots
from keras_vmoe.analysis import statistics
from keras_vmoe.analysis.collect import LayerRouting
from keras_vmoe.analysis.collect import RoutingResult
from keras_vmoe.analysis.collect import accuracy
from keras_vmoe.analysis.collect import collect_routing
from keras_vmoe.analysis.distillation import DistillationModel
from keras_vmoe.analysis.distillation import distillation_loss
from keras_vmoe.analysis.report import parameter_breakdown
from keras_vmoe.analysis.report import write_report
from keras_vmoe.analysis.statistics import class_expert_counts
from keras_vmoe.analysis.statistics import distinct_routes
from keras_vmoe.analysis.statistics import expert_counts_per_image
from keras_vmoe.analysis.statistics import expert_importance
from keras_vmoe.analysis.statistics import expert_load
from keras_vmoe.analysis.statistics import expert_similarity
from keras_vmoe.analysis.statistics import gate_entropy
from keras_vmoe.analysis.statistics import patches_per_expert_cdf
from keras_vmoe.analysis.statistics import routing_degree
from keras_vmoe.analysis.statistics import specialization_score
from keras_vmoe.analysis.statistics import sweetspot_similarity
from keras_vmoe.analysis.surgery import fold_expert_weights
from keras_vmoe.analysis.surgery import merge_experts
from keras_vmoe.analysis.surgery import prune_moe_layers
