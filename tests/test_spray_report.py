"""What the SpRAy callback reports about a class: usable rows, scalars, the flagged share, tables."""
from __future__ import annotations

import numpy as np

from xai_callbacks.spray import check_heatmaps, spray
from xai_callbacks.spray.report import (class_scalars, clusters_table, embedding_table, suspicious_share,
                                        usable_rows)

from test_spray import strategies


def test_usable_rows_leave_out_broken_heatmaps_and_skip_small_classes():
    heat, _ = strategies((6, 6))
    heat[0] = np.nan
    heat[1] = 1.0  # constant
    labels = np.array([0] * 6 + [1] * 6)
    rows, problems = usable_rows(labels, check_heatmaps(heat), 0, k=3, name="cat")
    assert rows.tolist() == [2, 3, 4, 5]
    assert len(problems) == 1 and problems[0].startswith("class cat: 2 heatmap(s) are NaN / inf or constant and "
                                                         "were left out (constant: the class's score does not")
    rows, problems = usable_rows(labels, check_heatmaps(heat), 1, k=6, name="dog")
    assert rows is None and problems == ["class dog: 6 usable heatmap(s), SpRAy with k=6 needs more than 6; skipped "
                                         "(raise max_per_class or lower spray_options['k'])"]
    rows, problems = usable_rows(labels, check_heatmaps(heat), 0, k=4, name="cat")
    assert rows is None and problems[1].endswith("; for the NaN / constant ones try another method or check the "
                                                 "model's output for the class)")


def test_scalars_share_and_tables_describe_the_result():
    heat, _ = strategies((30, 30, 8))
    result = spray(heat, k=8, visualisation="pca", seed=0)
    ids = [7 + j for j in range(result.n_clusters)]
    values = class_scalars(result, ids)
    top = int(np.argmax(result.cluster_suspicion))
    assert values == {"n_clusters": float(result.n_clusters), "max_suspicion": result.max_suspicion,
                      "n_flagged": float(result.flagged.sum()), "suspicious_strategy": float(ids[top])}
    other = spray(heat[:40], k=8, visualisation="pca", seed=0)
    result.flagged, other.flagged = np.arange(result.n_clusters) == 0, np.zeros(other.n_clusters, bool)
    expected = (result.labels == 0).sum() / (len(heat) + 40)  # flagged samples over all analysed ones
    assert expected > 0 and abs(suspicious_share([result, other]) - expected) < 1e-12
    assert suspicious_share([]) is None
    sample_ids = list(range(100, 100 + len(heat)))
    columns, rows = embedding_table(result, ids, sample_ids)
    assert columns[:5] == ["sample_id", "x", "y", "strategy", "suspicion"] and len(rows) == len(heat)
    assert {row[3] for row in rows} == {ids[j] for j in set(result.labels.tolist())}
    pictures = [np.zeros((2, 2, 3), np.uint8)] * result.n_clusters
    columns, rows = clusters_table(result, ids, sample_ids, pictures, pictures)
    assert [row[0] for row in rows] == ids and [row[1] for row in rows] == result.cluster_sizes.tolist()
    assert rows[0][-1] == " ".join(str(100 + i) for i in result.typical[0])
