"""Two DDP processes on CPU (gloo) give the answers of one process; a gate stops every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(out, devices):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_script.py"), str(out), str(devices)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_match_one_process(tmp_path):
    (single,) = _run(tmp_path / "single", 1)
    ranks = _run(tmp_path / "ddp", 2)
    assert [r["world_size"] for r in ranks] == [2, 2]
    # the probe set is identical on all ranks and to the single process
    assert ranks[0]["probe_indices"] == ranks[1]["probe_indices"] == single["probe_indices"]
    # heatmaps were split across ranks and gathered: every rank holds all of them
    for method, total in single["heatmap_sums"].items():
        for r in ranks:
            assert r["heatmap_sums"][method] == pytest.approx(total, rel=1e-5, abs=1e-6), method
    # only rank 0 wrote, and what it wrote equals the single-process heatmaps
    one = np.load(tmp_path / "single" / "validate" / "version_0" / "xai" / "heatmaps" / "epoch_0000.npz")
    two = np.load(tmp_path / "ddp" / "validate" / "version_0" / "xai" / "heatmaps" / "epoch_0000.npz")
    for key in one.files:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # synced metric states: the logged values equal the single-process ones
    for key in ("xai/saliency/sparseness", "xai/saliency/relevance_mass"):
        assert ranks[0]["values"][key] == pytest.approx(single["values"][key], rel=1e-5)
        assert ranks[1]["values"][key] == pytest.approx(single["values"][key], rel=1e-5)
    # SpRAy: the same clusters from heatmaps explained on two ranks and gathered
    assert ranks[0]["spray_labels"] == single["spray_labels"] and set(single["spray_labels"]) == {"0", "1"}
    for key in ("spray/0/n_clusters", "spray/1/max_suspicion", "spray/suspicious_share"):
        assert ranks[1]["values"][key] == pytest.approx(single["values"][key], rel=1e-4), key
    # its causal check: the same evidence on every rank, each rank evaluating half of the inputs
    for r in ranks:
        np.testing.assert_allclose(r["excess"], single["excess"], atol=1e-5)
        np.testing.assert_allclose(r["drop"], single["drop"], atol=1e-5)
        assert r["check_passes"] == single["check_passes"] == single["check_inputs"] > 0
        assert 0.4 * single["check_inputs"] < r["check_inputs"] < 0.6 * single["check_inputs"]
    # the gate's decision is taken on all ranks together: both stop after the first epoch
    assert [r["stopped_at_epoch"] for r in ranks] == [1, 1] and single["stopped_at_epoch"] == 1
    assert [r["gate_passed"] for r in ranks] == [False, False]
