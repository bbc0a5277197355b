"""The demo's wiring on a small slice of Fashion-MNIST (the full demo is `make demo`)."""

import json

from dmm.demo import run_demo
from dmm.distill import DistillConfig
from dmm.synth import InversionConfig


def test_demo_writes_three_rows_and_grid(tmp_path):
    lines = []
    rows = run_demo(tmp_path, seed=0, rounds=1, n_train=3000, n_test=300, report=lines.append,
                    dmm_overrides={
                        "inversion": InversionConfig(n_images=20, batch_size=10, iterations=3),
                        "distillation": DistillConfig(optimizer="sgd", lr=1e-3, steps=3,
                                                      trainable="all", batch_size=10)})
    assert [r["method"] for r in rows] == ["FedAvg", "FedAvg + buffer aggregation",
                                           "FedAvg + DMM"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == 3
    for r in saved["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["wall_time_s"] >= 0
        assert "rare_class_accuracy" in r
    assert saved["config"]["alpha"] == 0.01 and "commit" in saved["provenance"]
    assert (tmp_path / "pseudo_data.png").stat().st_size > 0
    assert any("FedAvg + DMM" in line for line in lines)
