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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_verdict_says_when_heterogeneous_search_cannot_pay(seed):
    """A gallery model whose gallery vectors are noisier than the query model's own: the headroom is negative
    and searching them costs accuracy, by construction (noise 2.0 against 0.3, far apart) and on every seed."""
    labels, draw = _clusters(seed, n_classes=8, per_class=10)
    weak_gallery = hvs.evaluate_embeddings(
        labels,
        labels,
        query_model_emb={"query": draw(0.3), "gallery": draw(0.3)},
        gallery_model_emb={"query": draw(2.0), "gallery": draw(2.0)},
        n_boot=200,
    )
    assert weak_gallery["headroom"]["map"]["ci95"][1] < 0
    verdict = weak_gallery["verdict"]
    assert len(verdict) == 2
    assert verdict[0].startswith("the gallery model is no stronger than the query model alone: map M(g->g)")
    assert verdict[1].startswith("the query model does better searching its own embeddings of the gallery")

    strong_gallery = hvs.evaluate_embeddings(
        labels,
        labels,
        query_model_emb={"query": draw(1.0), "gallery": draw(1.0)},
        gallery_model_emb={"query": draw(0.1), "gallery": draw(0.1)},
        n_boot=200,
    )
    assert strong_gallery["verdict"] == [] and strong_gallery["headroom"]["map"]["ci95"][0] > 0


def test_evaluate_reports_each_verdict_line_for_a_compatible_query_model(tmp_path, monkeypatch):
    """The wiring: every verdict line of the numbers becomes a warning note of the report (printed by the CLI
    under the table), for a query model trained for this gallery (an independent one is expected not to pay,
    so it gets none)."""
    from conftest import TINY_SPEC, build_tiny_world

    import hvs.evaluate as ev

    build_tiny_world(tmp_path)
    real = ev.evaluate_embeddings
    line = "the gallery model is no stronger than the query model alone: (test line)"

    def with_verdict(*args, **kwargs):
        out = real(*args, **kwargs)
        out["verdict"] = [line]
        return out

    monkeypatch.setattr(ev, "evaluate_embeddings", with_verdict)
    result = ev.evaluate(tmp_path / "g", tmp_path / "q", TINY_SPEC, latency=False, n_boot=20)
    assert result["notes"].count(f"warning: {line}") == 1
    assert f"note: warning: {line}" in ev.format_report(result)
    alone = ev.evaluate(tmp_path / "g", tmp_path / "g", TINY_SPEC, latency=False, n_boot=20)
    assert not any("(test line)" in n for n in alone["notes"])
