"""The real ViRelAy (0.6.x) opens every project we write: through its own classes and through its
server's REST API on 127.0.0.1 every class, clustering, sample image and colour map answers 200."""
from __future__ import annotations

import dataclasses
import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import yaml

virelay_model = pytest.importorskip("virelay.model")
from virelay.server import Server  # noqa: E402

from xai_callbacks.spray import spray, write_virelay  # noqa: E402
from xai_callbacks.spray.virelay import category_name  # noqa: E402

SIZE = 16


def blobs(n_strategies: int, per: int, rng) -> np.ndarray:
    """(n_strategies * per, 1, SIZE, SIZE) heatmaps: a blob at one of ``n_strategies`` places, jittered."""
    centres = [(4, 4), (4, 11), (11, 8), (11, 2)]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    maps = []
    for s in range(n_strategies):
        for _ in range(per):
            cy, cx = np.array(centres[s]) + rng.normal(0, 0.5, 2)
            maps.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0) + 0.05 * rng.random((SIZE, SIZE))
                        - 0.02 * rng.random((SIZE, SIZE)))
    return np.stack(maps)[:, None].astype(np.float32)


def three_classes(tmp_path):
    """A project over three classes whose eigengap picks 2, 3 and 4 strategies; one is flagged."""
    rng = np.random.default_rng(0)
    heat = np.concatenate([blobs(2, 8, rng), blobs(3, 8, rng), blobs(4, 8, rng)])
    labels = np.repeat([0, 1, 2], [16, 24, 32])
    results = {}
    for c in range(3):
        rows = np.flatnonzero(labels == c)
        r = spray(heat[rows], k=5, visualisation="pca", max_clusters=6)
        flagged = np.zeros(r.n_clusters, bool)
        flagged[-1] = c == 1  # the detector's verdict is not what is tested here
        results[c] = (rows, dataclasses.replace(r, flagged=flagged))
    inputs = rng.normal(size=heat.shape).astype(np.float32)  # standardised, single channel
    scores = rng.normal(size=(len(labels), 3)).astype(np.float32)
    paths = write_virelay(tmp_path / "db", heat, labels, results, inputs=inputs, predictions=scores,
                          indices=np.arange(500, 500 + len(labels)), class_names={0: "zero", 1: "one", 2: "two"},
                          strategy_ids={1: [7, 8, 9]}, attribution_method="lrp.epsilon_plus_flat",
                          target="prediction")
    return paths, results, heat, labels


@contextmanager
def serve(project_yaml):
    """ViRelAy's Flask app over one project, served on a free port of 127.0.0.1."""
    from werkzeug.serving import make_server

    workspace = virelay_model.Workspace()
    workspace.add_project(str(project_yaml))
    http = make_server("127.0.0.1", 0, Server(workspace).app, threaded=False)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()
        thread.join()
        workspace.close()


def get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200, url
            return response.read()
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{url} answered {err.code}: {err.read()[:300]!r}") from None


def check_rest(base: str, every: int = 1) -> dict:
    """Walk ViRelAy's REST API as its UI does (every ``every``-th sample); every answer must be 200.
    Returns counts of what was seen."""
    seen = {"categories": 0, "analyses": 0, "samples": 0, "heatmaps": 0}
    (project,) = json.loads(get(f"{base}/api/projects"))
    detail = json.loads(get(f"{base}/api/projects/{project['id']}"))
    color_maps = [c["name"] for c in json.loads(get(f"{base}/api/color-maps"))]
    assert len(color_maps) == 8
    for c in color_maps:
        get(f"{base}/api/color-maps/{c}")
    attribution_indices = set()
    for method in detail["analysisMethods"]:
        for category in method["categories"]:
            seen["categories"] += 1
            for clustering in method["clusterings"]:
                for embedding in method["embeddings"]:
                    analysis = json.loads(get(f"{base}/api/projects/0/analyses/{method['name']}?category="
                                              f"{category['name']}&clustering={clustering}&embedding={embedding}"))
                    seen["analyses"] += 1
                    attribution_indices |= {e["attributionIndex"] for e in analysis["embedding"]}
    for i in sorted(attribution_indices)[::every]:
        sample = json.loads(get(f"{base}/api/projects/0/dataset/{i}"))
        image = get(f"{base}{sample['url']}")
        assert image[:2] == b"\xff\xd8"  # a JPEG
        seen["samples"] += 1
        for mode in ("overlay", "attribution", "input"):
            attribution = json.loads(get(f"{base}/api/projects/0/attributions/{i}?imageMode={mode}"))
            assert sorted(attribution["urls"]) == sorted(color_maps) and len(attribution["prediction"]) > 0
            for url in set(attribution["urls"].values()):  # in "input" mode all point at the sample image
                assert get(f"{base}{url}")[:2] == b"\xff\xd8"
                seen["heatmaps"] += mode != "input"
    batch = ",".join(str(i) for i in sorted(attribution_indices)[:5])
    get(f"{base}/api/projects/0/attributions?indices={batch}&imageMode=overlay")
    return seen


def test_written_project_opens_through_virelays_classes(tmp_path):
    paths, results, heat, labels = three_classes(tmp_path)
    project = virelay_model.Project(str(paths["project"]))
    try:
        assert project.attribution_strategy == "predicted_label"
        assert project.attribution_method == "lrp.epsilon_plus_flat"
        clusterings = project.get_analysis_clustering_names("spray")
        assert clusterings[:2] == ["eigengap", "flagged"]
        assert clusterings[2:] == [f"kmeans-{k:02d}" for k in range(2, 7)]
        assert [c.name for c in project.get_analysis_categories("spray")] == [category_name(c) for c in range(3)]
        assert [c.human_readable_name for c in project.get_analysis_categories("spray")] == ["zero", "one", "two"]
        for c, (rows, r) in results.items():
            for clustering in clusterings:  # every name the first class advertises exists in every class
                for embedding in project.get_analysis_embedding_names("spray"):
                    analysis = project.get_analysis("spray", category_name(c), clustering, embedding)
                    assert list(analysis.attribution_indices) == list(rows)
            eigengap = project.get_analysis("spray", category_name(c), "eigengap", "spectral")
            assert (eigengap.clustering == r.labels).all() and len(set(r.labels)) == c + 2
            np.testing.assert_allclose(eigengap.eigenvalues, r.eigenvalues, rtol=1e-6)
            kmeans = project.get_analysis("spray", category_name(c), f"kmeans-{c + 2:02d}", "spectral").clustering
            assert (kmeans == r.labels).all()  # the eigengap's K among the alternatives is SpRAy's own labelling
            flagged = project.get_analysis("spray", category_name(c), "flagged", "pca").clustering
            assert (flagged == np.isin(r.labels, np.flatnonzero(r.flagged))).all()
            assert flagged.any() == (c == 1)
        for i in range(len(labels)):
            sample = project.get_sample(i)
            assert sample.data.shape == (SIZE, SIZE, 3) and sample.data.dtype == np.uint8
            assert sample.labels[0].index == labels[i]
            attribution = project.get_attribution(i)
            # ViRelAy draws the channel sum: that is the relevance we wrote
            np.testing.assert_allclose(attribution.data.sum(-1), heat[i, 0], rtol=1e-5, atol=1e-7)
        for cmap in ("gray-red", "black-green", "black-fire-red", "black-yellow", "blue-white-red", "afm-hot",
                     "jet", "seismic"):
            attribution = project.get_attribution(3)
            assert attribution.render_heatmap(cmap).shape == (SIZE, SIZE, 3)
            assert attribution.render_heatmap(cmap, project.get_sample(3).data).shape == (SIZE, SIZE, 3)
    finally:
        project.close()


def test_written_project_answers_200_through_virelays_server(tmp_path):
    paths, results, _, labels = three_classes(tmp_path)
    with serve(paths["project"]) as base:
        seen = check_rest(base)
    n_clusterings = 2 + 5
    n_embeddings = 2  # spectral and pca
    assert seen == {"categories": 3, "analyses": 3 * n_clusterings * n_embeddings, "samples": len(labels),
                    "heatmaps": len(labels) * 8 * 2}


def test_callback_project_opens_in_virelay(tmp_path, capsys):
    """The files SpRAyCallback writes while training (single-channel digits) open in ViRelAy; its
    work shows in the progress bar class by class."""
    from conftest import make_trainer
    from lightning.pytorch.callbacks import TQDMProgressBar

    from xai_callbacks import SpRAyCallback
    from xai_callbacks.data import ShortcutDigitsDataModule
    from xai_callbacks.models import Classifier, DemoCNN

    torch.manual_seed(0)
    dm = ShortcutDigitsDataModule(batch_size=64)
    module = Classifier(DemoCNN(width=4, image_size=32))
    cb = SpRAyCallback(classes=[0, 1, 2], max_per_class=12, target="prediction", on_error="raise",
                       spray_options={"k": 4, "visualisation": None, "max_clusters": 4},
                       asynchronous=False)  # inline, so the progress bar shows the analysis's steps
    make_trainer(tmp_path, [cb, TQDMProgressBar()], max_epochs=1, limit_train_batches=2,
                 enable_progress_bar=True).fit(module, dm)
    assert "SpRAyCallback: SpRAy class 2" in capsys.readouterr().out
    (project_yaml,) = sorted(tmp_path.rglob("project.yaml"))
    spec = yaml.safe_load(project_yaml.read_text())["project"]
    assert spec["attributions"]["attribution_strategy"] == "predicted_label"
    with serve(project_yaml) as base:
        seen = check_rest(base)
    assert seen["categories"] == 3 and seen["samples"] == 36 and seen["heatmaps"] == 36 * 16


def test_rgb_project_answers_200_through_virelays_server(tmp_path):
    """Three-channel inputs and relevance (the usual image case) open as well."""
    rng = np.random.default_rng(1)
    heat = np.concatenate([blobs(2, 12, rng), blobs(3, 12, rng)]).repeat(3, axis=1) / 3
    labels = np.repeat([0, 1], [24, 36])
    results = {c: (np.flatnonzero(labels == c), spray(heat[labels == c], k=5, visualisation=None, max_clusters=4))
               for c in range(2)}
    paths = write_virelay(tmp_path / "rgb", heat, labels, results, inputs=rng.random(heat.shape),
                          predictions=rng.normal(size=(len(labels), 2)))
    project = virelay_model.Project(str(paths["project"]))
    try:
        np.testing.assert_allclose(project.get_attribution(5).data.sum(-1), heat[5].sum(0), rtol=1e-5, atol=1e-7)
        assert project.get_sample(5).data.shape == (SIZE, SIZE, 3)
    finally:
        project.close()
    with serve(paths["project"]) as base:
        seen = check_rest(base, every=6)  # the single-channel tests above walk every sample
    assert seen == {"categories": 2, "analyses": 2 * (2 + 3) * 1, "samples": 10, "heatmaps": 10 * 16}


def test_causal_evidence_is_kept_in_the_analysis_file(tmp_path):
    import h5py

    from xai_callbacks.infill import get_infiller
    from xai_callbacks.spray.evidence import SampleEvidence

    rng = np.random.default_rng(2)
    heat = blobs(2, 8, rng)
    r = spray(heat, k=5, visualisation=None, max_clusters=3)
    n = len(heat)
    confirmed = np.arange(n) < 4
    z = np.where(confirmed, 9.0, rng.random(n))
    evidence = SampleEvidence(classes=np.zeros(n, int), component=np.full(n, "region"), rise=z / 20,
                              excess=z / 25, flip_rate=z / 10, drop=z / 30, z=z, separation=confirmed * 5.0,
                              separation_ratio=np.full(n, 1.25), confirmed=confirmed,
                              regions=torch.zeros(n, SIZE, SIZE, dtype=torch.bool),
                              partners=np.zeros((n, 2), int), passes=np.full(n, 10),
                              infiller=get_infiller("blur"), params=dict(min_members=3, max_share=0.5))
    r = r.confirm(evidence, np.arange(n), heat)
    flagged = int(np.flatnonzero(r.flagged)[0])
    assert r.flagged.sum() == 1 and (r.labels[:4] == flagged).all() and (r.labels[4:] != flagged).all()
    assert r.evidence.forward_passes == 10 * n   # the class's samples' passes
    paths = write_virelay(tmp_path / "ev", heat, np.zeros(n, int), {0: (np.arange(n), r)}, inputs=heat,
                          predictions=np.zeros((n, 2)))
    with h5py.File(paths["analysis"]) as f:
        e = f["00000000/spray/evidence"]
        np.testing.assert_allclose(e["transfer_rate"][:], r.evidence.transfer_rate)
        assert e.attrs["separation_ratio"] == 1.25
        assert e["transfer_rate"][flagged] == pytest.approx(0.9)
        assert list(e["flagged"][:]) == list(r.flagged) and e["region"].shape == (n, SIZE, SIZE)
        assert e["component"][flagged] == b"region"
        assert list(f["00000000/cluster/flagged"][:]) == list(np.isin(r.labels, np.flatnonzero(r.flagged)))


def test_token_rows_and_signals_open_in_virelay(tmp_path):
    """ViRelAy takes a picture's shortest axis for its channels: a one-row picture (token ids (N, L)
    through SpRAyCallback, as tabular rows are analysed; a two-channel signal (N, 2, L)) failed in its
    server (500 on every sample). Now each is a strip of 8 x L pixels whose heatmap sums to the relevance
    (the channel sum for the signal), and every answer is 200."""
    from conftest import make_trainer
    from test_architectures import TextTransformer
    from torch.utils.data import DataLoader, TensorDataset

    from xai_callbacks import SpRAyCallback
    from xai_callbacks.models import Classifier

    gen = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 50, (32, 10), generator=gen), torch.arange(32) % 2
    cb = SpRAyCallback(max_per_class=16, spray_options={"visualisation": None}, evidence=False, on_error="raise")
    make_trainer(tmp_path / "tokens", [cb]).validate(Classifier(TextTransformer()),
                                                     DataLoader(TensorDataset(tokens, y), 16), verbose=False)
    (project_yaml,) = sorted((tmp_path / "tokens").rglob("project.yaml"))
    rng = np.random.default_rng(0)
    heat = rng.normal(size=(24, 2, 1, 20)).astype(np.float32)   # a two-channel signal's relevance
    labels = np.repeat([0, 1], 12)
    results = {c: (np.flatnonzero(labels == c), spray(heat[labels == c].sum(1), k=4, visualisation=None,
                                                      max_clusters=3)) for c in range(2)}
    signal = write_virelay(tmp_path / "signal", heat, labels, results, inputs=rng.random(heat.shape),
                           predictions=rng.normal(size=(24, 2)))["project"]
    for path, length, relevance in ((project_yaml, 10, None), (signal, 20, heat.sum(1)[:, 0])):
        project = virelay_model.Project(str(path))
        try:
            for i in (0, 5):
                assert project.get_sample(i).data.shape == (8, length, 3)
                drawn = project.get_attribution(i).data.sum(-1)
                assert drawn.shape == (8, length) and (drawn == drawn[:1]).all()   # the row, 8 times
                if relevance is not None:
                    np.testing.assert_allclose(drawn[0], relevance[i], rtol=1e-5, atol=1e-6)
        finally:
            project.close()
        with serve(path) as base:
            seen = check_rest(base, every=4)
        assert seen["samples"] > 0 and seen["heatmaps"] == seen["samples"] * 16
