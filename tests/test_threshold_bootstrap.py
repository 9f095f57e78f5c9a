"""Bootstrap of TPIR@FPIR and TAR@FAR: each resample must equal the metric recomputed from scratch
on the expanded query set (every query repeated as often as the resample drew it)."""

import numpy as np
import pytest
import torch

from hvs.metrics import percentile_interval, resample_weights, retrieval_metrics, tar_bootstrap, tpir_bootstrap

FARS = (1e-1, 1e-2, 1e-3)
FPIRS = (1e-1, 5e-2)


def _data(seed: int = 0, n_q: int = 240, n_g: int = 150, n_id: int = 30, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_id + 10, dim, generator=g)
    ql = torch.randint(0, n_id + 10, (n_q,), generator=g)  # ids >= n_id: not in the gallery
    gl = torch.randint(0, n_id, (n_g,), generator=g)
    q = centers[ql] + 0.9 * torch.randn(n_q, dim, generator=g)
    ge = centers[gl] + 0.9 * torch.randn(n_g, dim, generator=g)
    return q, ql, ge, gl


def test_all_ones_weights_give_the_point_estimate():
    q, ql, g, gl = _data()
    r = retrieval_metrics(
        q, ql, g, gl, nonmated_query_mask=ql >= 30, far_targets=FARS, fpir_targets=FPIRS, pair_scores=True
    )
    pp, ps = r["per_probe"], r["pair_scores"]
    for f in FPIRS:
        est = tpir_bootstrap(pp, f, np.ones((1, len(q)), np.int32))[0]
        assert est == pytest.approx(r[f"tpir@fpir={f:.0e}"], abs=1e-12)
        assert 0 < est < 1  # the data carries signal: a meaningful check
    for f in FARS:
        est = tar_bootstrap(ps, f, np.ones((1, len(q)), np.int32))[0]
        assert est == pytest.approx(r[f"tar@far={f:.0e}"], abs=1e-12)


@pytest.mark.parametrize("open_set", [True, False])
def test_each_resample_equals_the_metric_on_the_expanded_query_set(open_set):
    q, ql, g, gl = _data(seed=1)
    if not open_set:  # closed set: every probe has mates, leave-identity-out non-mates
        keep = ql < 30
        q, ql = q[keep], ql[keep]
    mask = (ql >= 30) if open_set else None
    r = retrieval_metrics(
        q, ql, g, gl, nonmated_query_mask=mask, far_targets=FARS, fpir_targets=FPIRS, pair_scores=True
    )
    w = resample_weights(len(q), n_boot=3, seed=7)
    tar = {f: tar_bootstrap(r["pair_scores"], f, w) for f in FARS}
    for b in range(3):
        idx = torch.from_numpy(np.repeat(np.arange(len(q)), w[b]))
        ref = retrieval_metrics(
            q[idx],
            ql[idx],
            g,
            gl,
            far_targets=FARS,
            fpir_targets=(),
            nonmated_query_mask=None if mask is None else mask[idx],
        )
        for f in FARS:
            assert tar[f][b] == pytest.approx(ref[f"tar@far={f:.0e}"], abs=1e-12)

    # TPIR: a resample of the queries, each query in all its roles (closed set: mated and non-mated)
    for f in FPIRS:
        vals = tpir_bootstrap(r["per_probe"], f, w)
        for b in range(3):
            idx = torch.from_numpy(np.repeat(np.arange(len(q)), w[b]))
            ref = retrieval_metrics(
                q[idx],
                ql[idx],
                g,
                gl,
                far_targets=(),
                fpir_targets=(f,),
                nonmated_query_mask=None if mask is None else mask[idx],
            )
            assert vals[b] == pytest.approx(ref[f"tpir@fpir={f:.0e}"], abs=1e-12)
            assert 0 < vals[b] < 1


def test_pair_scores_survive_buffer_pruning(monkeypatch):
    import hvs.metrics as metrics

    monkeypatch.setattr(metrics, "_IMPOSTOR_BUFFER_MIN", 16)
    q, ql, g, gl = _data(seed=2)
    r = retrieval_metrics(q, ql, g, gl, far_targets=(1e-2,), fpir_targets=(), pair_scores=True, chunk_size=7)
    w = resample_weights(len(q), n_boot=50, seed=0)
    vals = tar_bootstrap(r["pair_scores"], 1e-2, w)
    assert np.isfinite(vals).all()  # thresholds stay inside the pruned buffer
    idx = torch.from_numpy(np.repeat(np.arange(len(q)), w[0]))
    ref = retrieval_metrics(q[idx], ql[idx], g, gl, far_targets=(1e-2,), fpir_targets=())
    assert vals[0] == pytest.approx(ref["tar@far=1e-02"], abs=1e-12)


def test_resample_weights_and_interval():
    w = resample_weights(50, n_boot=20, seed=1)
    assert w.shape == (20, 50) and (w.sum(axis=1) == 50).all()
    assert (w == resample_weights(50, n_boot=20, seed=1)).all()
    assert percentile_interval(np.array([np.nan] + [0.5] * 99)) is None  # NaNs are never dropped
    lo, hi = percentile_interval(np.linspace(0, 1, 1001))
    assert lo == pytest.approx(0.025) and hi == pytest.approx(0.975)
    with pytest.raises(ValueError):
        tpir_bootstrap(
            {
                "mated_score": np.ones(3),
                "nonmated_score": np.ones(2),
                "mated_query": np.arange(3),
                "nonmated_query": np.array([3, 4]),
            },
            0.1,
            np.ones((1, 4)),
        )


def test_a_threshold_beyond_the_kept_impostors_is_nan_not_a_guess():
    # two queries hold all the top impostors: a resample without them needs scores never kept
    n_q = 6
    imp_per_q = np.full(n_q, 5000)
    scores = np.concatenate([np.full(5000, 0.9), np.full(5000, 0.8)])
    owners = np.concatenate([np.zeros(5000, np.int64), np.ones(5000, np.int64)])
    ps = {
        "impostors_per_query": imp_per_q,
        "genuine_per_query": np.ones(n_q, np.int64),
        "impostor_top_score": scores,
        "impostor_top_query": owners,
        "genuine_score": np.linspace(0.5, 1.0, n_q),
        "genuine_query": np.arange(n_q),
    }
    w = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 2, 2, 1, 1]], np.int32)
    vals = tar_bootstrap(ps, 1e-1, w)
    assert np.isfinite(vals[0]) and np.isnan(vals[1])
    assert percentile_interval(vals) is None
