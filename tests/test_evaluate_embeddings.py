"""hvs.evaluate_embeddings: the evaluation of embeddings a user made with their own code."""

import numpy as np
import pytest
import torch

import hvs
from hvs.evaluate import EvaluationError
from hvs.metrics import retrieval_metrics


def _clusters(seed: int, n_classes: int = 6, per_class: int = 8, dim: int = 16, noise: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return labels, lambda s: centres[labels] + s * torch.randn(len(labels), dim, generator=g)


def test_each_pair_equals_retrieval_metrics_on_the_same_embeddings():
    labels, draw = _clusters(0)
    q_q, q_g, g_q, g_g = draw(1.0), draw(1.0), draw(0.3), draw(0.3)
    r = hvs.evaluate_embeddings(
        labels,
        labels,
        query_model_emb={"query": q_q, "gallery": q_g},
        gallery_model_emb={"query": g_q, "gallery": g_g},
        n_boot=50,
    )
    for key, (q, g) in {
        "query->gallery": (q_q, g_g),
        "query->query": (q_q, q_g),
        "gallery->gallery": (g_q, g_g),
    }.items():
        ref = retrieval_metrics(q, labels, g, labels)
        for name in ("recall@1", "recall@5", "map"):
            assert r["metrics"][key][name] == pytest.approx(ref[name], abs=1e-12)
    crit = r["compatibility_criterion"]["map"]
    assert crit["difference"] == pytest.approx(
        r["metrics"]["query->gallery"]["map"] - r["metrics"]["query->query"]["map"], abs=1e-9
    )
    assert crit["ci95"][0] <= crit["difference"] <= crit["ci95"][1]
    assert r["gap_to_paragon"]["map"]["gap"] == pytest.approx(
        r["metrics"]["gallery->gallery"]["map"] - r["metrics"]["query->gallery"]["map"], abs=1e-9
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_clean_gallery_side_meets_the_criterion(seed):
    """Queries noisy in both spaces; gallery vectors near the class centres (a strong gallery model): searching
    them beats searching the query model's own noisy gallery vectors, by construction and by a wide margin."""
    labels, draw = _clusters(seed, noise=1.0)
    r = hvs.evaluate_embeddings(
        labels,
        labels,
        query_model_emb={"query": draw(1.2), "gallery": draw(1.2)},
        gallery_model_emb={"gallery": draw(0.1)},
        n_boot=100,
    )
    assert r["compatibility_criterion"]["map"]["significant"]
    assert "gallery->gallery" not in r["metrics"] and "map" not in r["gap_to_paragon"]


def test_only_the_heterogeneous_pair_is_required():
    labels, draw = _clusters(3)
    r = hvs.evaluate_embeddings(
        labels.numpy(),
        labels.numpy(),
        query_model_emb={"query": draw(1.0).numpy()},
        gallery_model_emb={"gallery": draw(0.5).numpy()},
        n_boot=10,
    )
    assert set(r["metrics"]) == {"query->gallery"} and r["compatibility_criterion"] == {}
    with pytest.raises(EvaluationError, match="query model's embeddings of the queries"):
        hvs.evaluate_embeddings(
            labels, labels, query_model_emb={"gallery": draw(1.0)}, gallery_model_emb={"gallery": draw(0.5)}
        )


def test_open_set_probes_are_non_mated():
    labels, draw = _clusters(4)
    keep = labels < 4  # identities 4 and 5 have no gallery item
    r = hvs.evaluate_embeddings(
        labels,
        labels[keep],
        query_model_emb={"query": draw(1.0)},
        gallery_model_emb={"gallery": draw(0.5)[keep]},
        n_boot=10,
    )
    assert r["metrics"]["query->gallery"]["n_nonmated_probes"] == int((~keep).sum())
    assert np.isfinite(r["metrics"]["query->gallery"]["map"])
