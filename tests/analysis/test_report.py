"""`write_report` and the parameter / FLOPs breakdown."""

import json
import os

import matplotlib.image
import numpy as np

from keras_vmoe.analysis import parameter_breakdown
from keras_vmoe.analysis import write_report
from keras_vmoe.models import model_stats
from tests.analysis.tiny_models import tiny_classifier
from tests.analysis.tiny_models import tiny_data


def test_breakdown_rows_add_up_to_model_totals():
    model = tiny_classifier(top_k=2)
    breakdown = parameter_breakdown(model)
    totals = model_stats(model, image_size=16)
    assert breakdown["total"] == totals
    rows = {row["name"]: row for row in breakdown["rows"]}
    for key in ("params", "active_params", "flops"):
        assert sum(row[key] for row in rows.values()) == totals[key]
    block_names = [
        name for name in rows if name.endswith(("block_1", "block_2"))
    ]
    assert len(block_names) == 2
    dense = next(name for name in rows if name.endswith("block_0"))
    for name in block_names:
        # Two of four experts are active in an MoE block.
        assert rows[name]["params"] > rows[name]["active_params"]
    assert rows[dense]["params"] == rows[dense]["active_params"]


def test_write_report_writes_plots_numbers_and_index(tmp_path):
    images, labels = tiny_data(8)
    report = write_report(
        tiny_classifier(),
        (images, labels),
        str(tmp_path),
        batch_size=4,
        num_gating_images=2,
        dpi=40,
    )
    names = sorted(os.listdir(tmp_path))
    for expected in (
        "index.md",
        "report.json",
        "load.png",
        "heatmap_layer_0.png",
        "gating_layer_1.png",
        "similarity_layer_1.png",
    ):
        assert expected in names
    for name in names:
        if name.endswith(".png"):
            assert matplotlib.image.imread(tmp_path / name).size > 0
    with open(tmp_path / "report.json") as handle:
        numbers = json.load(handle)
    assert numbers["routing"]["routing_degree"] == 16
    assert len(numbers["routing"]["layers"]) == 2
    layer = numbers["routing"]["layers"][0]
    assert layer["specialization"] is not None
    # The normalisation is named; the arithmetic-mean NMI is never above
    # the min-normalised one.
    assert layer["specialization_normalization"] == "min"
    assert layer["specialization_arithmetic"] <= layer["specialization"] + 1e-12
    assert np.shape(layer["expert_similarity_sweetspot"]) == (4, 4)
    assert numbers["parameters"]["total"]["params"] > 0
    index = (tmp_path / "index.md").read_text()
    assert "heatmap_layer_0.png" in index and "Routing degree" in index
    assert "I(c; e) / min(H(c), H(e))" in index and "NMI, arithmetic" in index
    assert set(report["files"]) == {str(tmp_path / name) for name in names}
    assert "patches_per_expert_cdf.png" not in names  # image routing


def test_write_report_token_routing_has_cdf_and_patch_maps(tmp_path):
    images, labels = tiny_data(4)
    model = tiny_classifier(routing="token", top_k=2)
    report = write_report(model, (images, labels), str(tmp_path), dpi=40)
    assert (tmp_path / "patches_per_expert_cdf.png").exists()
    assert report["routing"]["routing_degree"] is None
    assert "patches_per_expert_cdf.png" in (tmp_path / "index.md").read_text()


def test_write_report_without_labels_skips_heatmaps(tmp_path):
    images, _ = tiny_data(4)
    report = write_report(tiny_classifier(), images, str(tmp_path), dpi=40)
    assert not list(tmp_path.glob("heatmap_*.png"))
    assert (tmp_path / "gating_layer_0.png").exists()
    assert report["routing"]["layers"][0]["specialization"] is None
