"""Tests for hvs.metrics against naive references and hand-computed cases.

The reference implementations below are deliberately slow and independent of the fast code:
python loops over a score matrix given as lists, sorted() for ranking, and thresholds found by
scanning every candidate score. The fast code is compared with them on random data (ties from
rounded scores, queries without positives, exclude_self, open-set masks, tiny chunks, forced
buffer pruning) and on small cases whose answers are worked out by hand in the comments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hvs import metrics
from hvs.metrics import (
    bootstrap_ci,
    paired_bootstrap_ci,
    retrieval_metrics,
    retrieval_metrics_from_scores,
    similarity,
)

NEG_INF = float("-inf")
KS = (1, 2, 5, 10)
FARS = (0.5, 0.3, 0.1, 0.05, 1e-2, 1e-3, 1e-4)
FPIRS = (1.0, 0.5, 0.29, 0.1, 1e-2)


# ------------------------------------------------------------------------------------------
# naive references
# ------------------------------------------------------------------------------------------


def ref_cosine(q: torch.Tensor, g: torch.Tensor) -> list[list[float]]:
    def unit(rows):
        out = []
        for row in rows:
            norm = math.sqrt(sum(x * x for x in row))
            out.append([x / norm if norm > 0 else 0.0 for x in row])
        return out

    qn, gn = unit(q.tolist()), unit(g.tolist())
    return [[sum(a * b for a, b in zip(qr, gr)) for gr in gn] for qr in qn]


def gallery_of(i: int, n_g: int, exclude_self: bool) -> list[int]:
    return [j for j in range(n_g) if not (exclude_self and j == i)]


def ref_ranking(S, ql, gl, ks, exclude_self):
    """Recall@K / AP per query by sorting each query's gallery with sorted()."""
    hits = {k: [] for k in ks}
    aps, index, without = [], [], 0
    for i in range(len(S)):
        items = gallery_of(i, len(gl), exclude_self)
        ranked = sorted(items, key=lambda j: (-S[i][j], j))  # similarity desc, index asc
        rel = [gl[j] == ql[i] for j in ranked]
        if not any(rel):
            without += 1
            continue
        index.append(i)
        first = rel.index(True) + 1
        for k in ks:
            hits[k].append(1.0 if first <= k else 0.0)
        found, precisions = 0, []
        for rank, r in enumerate(rel, start=1):
            if r:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / len(precisions))
    return hits, aps, index, without


def ref_pairs(S, ql, gl, exclude_self):
    genuine, impostor = [], []
    for i in range(len(S)):
        for j in gallery_of(i, len(gl), exclude_self):
            (genuine if ql[i] == gl[j] else impostor).append(S[i][j])
    return genuine, impostor


def ref_lowest_threshold(negatives, candidates, rate):
    """Scan every candidate threshold; keep the lowest one with fraction above <= rate."""
    best = None
    for t in candidates:
        above = 0
        for x in negatives:
            if x > t:
                above += 1
        if above / len(negatives) <= rate and (best is None or t < best):
            best = t
    return best


def ref_tar(S, ql, gl, exclude_self, fars, min_count):
    genuine, impostor = ref_pairs(S, ql, gl, exclude_self)
    candidates = sorted(set(genuine) | set(impostor)) + [NEG_INF]
    out = {}
    for far in fars:
        if not impostor or far < min_count / len(impostor):
            continue
        t = ref_lowest_threshold(impostor, candidates, far)
        out[f"tar@far={far:.0e}"] = sum(1 for x in genuine if x > t) / len(genuine) if genuine else float("nan")
    return out, len(genuine), len(impostor)


def ref_tpir(S, ql, gl, exclude_self, mask, fpirs, min_count):
    mated, nonmate = [], []
    for i in range(len(S)):
        items = gallery_of(i, len(gl), exclude_self)
        if mask is None:  # leave-identity-out: every probe is non-mated once
            others = [S[i][j] for j in items if gl[j] != ql[i]]
            nonmate.append(max(others) if others else NEG_INF)
            if any(gl[j] == ql[i] for j in items):
                mated.append(i)
        elif mask[i]:
            nonmate.append(max(S[i][j] for j in items) if items else NEG_INF)
        else:
            mated.append(i)
    rank1 = {}
    for i in mated:
        items = gallery_of(i, len(gl), exclude_self)
        best = sorted(items, key=lambda j: (-S[i][j], j))[0]
        rank1[i] = (gl[best] == ql[i], S[i][best])
    candidates = sorted(set(nonmate) | {s for _, s in rank1.values()}) + [NEG_INF]
    out = {}
    for fpir in fpirs:
        if not nonmate or fpir < min_count / len(nonmate):
            continue
        t = ref_lowest_threshold(nonmate, candidates, fpir)
        ok = sum(1 for i in mated if rank1[i][0] and rank1[i][1] > t)
        out[f"tpir@fpir={fpir:.0e}"] = ok / len(mated) if mated else float("nan")
    return out, len(mated), len(nonmate)


def assert_matches_reference(
    res, S, ql, gl, *, ks=KS, exclude_self=False, fars=FARS, fpirs=FPIRS, mask=None, min_count=1
):
    S = S.tolist() if isinstance(S, torch.Tensor) else S
    ql, gl = [int(x) for x in ql], [int(x) for x in gl]
    hits, aps, index, without = ref_ranking(S, ql, gl, ks, exclude_self)
    assert res["n_queries"] == len(S)
    assert res["n_queries_without_positive"] == without
    np.testing.assert_array_equal(res["per_query"]["query_index"], index)
    for k in ks:
        np.testing.assert_array_equal(res["per_query"][f"hit@{k}"], hits[k])
        if index:
            assert res[f"recall@{k}"] == pytest.approx(sum(hits[k]) / len(index), abs=1e-12)
        else:
            assert math.isnan(res[f"recall@{k}"])
    np.testing.assert_allclose(res["per_query"]["ap"], aps, rtol=1e-12, atol=1e-12)
    if index:
        assert res["map"] == pytest.approx(sum(aps) / len(aps), abs=1e-12)

    tar, n_gen, n_imp = ref_tar(S, ql, gl, exclude_self, fars, min_count)
    assert (res["n_genuine_pairs"], res["n_impostor_pairs"]) == (n_gen, n_imp)
    assert {k for k in res if k.startswith("tar@")} == set(tar)
    for key, value in tar.items():
        assert res[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    assert res["smallest_far_supported"] == min((f for f in fars if f"tar@far={f:.0e}" in tar), default=None)

    tpir, n_mated, n_nm = ref_tpir(S, ql, gl, exclude_self, mask, fpirs, min_count)
    assert (res["n_mated_probes"], res["n_nonmated_probes"]) == (n_mated, n_nm)
    assert {k for k in res if k.startswith("tpir@")} == set(tpir)
    for key, value in tpir.items():
        assert res[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    assert res["smallest_fpir_supported"] == min((f for f in fpirs if f"tpir@fpir={f:.0e}" in tpir), default=None)


def random_case(seed, *, n_q=24, n_g=30, n_labels=8, decimals=1, exclude_self=False, foreign=0.2):
    """Rounded random scores (many ties) and labels; a fraction of queries get labels that are
    not in the gallery, so they have no positive."""
    gen = torch.Generator().manual_seed(seed)
    if exclude_self:
        n_g = n_q
    S = torch.rand(n_q, n_g, generator=gen, dtype=torch.float64) * 2 - 1
    S = torch.round(S * 10**decimals) / 10**decimals
    gl = torch.randint(0, n_labels, (n_g,), generator=gen)
    if exclude_self:
        ql = gl.clone()
    else:
        ql = torch.randint(0, n_labels, (n_q,), generator=gen)
        foreign_q = torch.rand(n_q, generator=gen) < foreign
        ql[foreign_q] += 100  # identities absent from the gallery
    return S, ql, gl


# ------------------------------------------------------------------------------------------
# similarity
# ------------------------------------------------------------------------------------------


def test_similarity_is_cosine_of_normalised_rows():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    S = similarity(q, g)
    assert S.shape == (5, 6) and S.dtype == torch.float64
    np.testing.assert_allclose(S.numpy(), ref_cosine(q, g), rtol=0, atol=1e-12)
    # scale invariance: normalisation happens inside
    np.testing.assert_allclose(similarity(3.0 * q, 0.01 * g).numpy(), S.numpy(), atol=1e-12)
    # an all-zero row has similarity 0 with everything; half precision is upcast
    q[0] = 0
    assert torch.all(similarity(q, g)[0] == 0)
    assert similarity(q.half(), g.half()).dtype == torch.float32


def test_similarity_rejects_bad_input():
    with pytest.raises(ValueError):
        similarity(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError):
        similarity(torch.tensor([[float("nan"), 1.0]]), torch.randn(2, 2))


# ------------------------------------------------------------------------------------------
# hand-computed cases
# ------------------------------------------------------------------------------------------


def test_recall_and_ap_hand_computed():
    # gallery labels [0, 1, 0, 2]
    # q0 (label 0): ranking g1(.9, l1) g2(.8, l0) g0(.2, l0) g3 -> positives at ranks 2 and 3:
    #     hit@1 = 0, hit@2 = 1, AP = (1/2 + 2/3) / 2 = 7/12
    # q1 (label 1): g1 (.95) is first -> hit@1 = 1, AP = 1
    # q2 (label 3): no positive in the gallery -> excluded from recall and mAP
    S = torch.tensor([[0.2, 0.9, 0.8, 0.1], [0.1, 0.95, 0.3, 0.7], [0.5, 0.4, 0.3, 0.2]])
    res = retrieval_metrics_from_scores(S, [0, 1, 3], [0, 1, 0, 2], ks=(1, 2, 5))
    assert res["recall@1"] == pytest.approx(1 / 2)
    assert res["recall@2"] == pytest.approx(1.0)
    assert res["recall@5"] == pytest.approx(1.0)
    assert res["map"] == pytest.approx((7 / 12 + 1) / 2)  # 19/24
    assert res["n_queries_without_positive"] == 1
    pq = res["per_query"]
    np.testing.assert_array_equal(pq["query_index"], [0, 1])
    np.testing.assert_array_equal(pq["hit@1"], [0.0, 1.0])
    np.testing.assert_allclose(pq["ap"], [7 / 12, 1.0])
    # per-query arrays are exactly what the averages average
    assert pq["ap"].mean() == res["map"] and pq["hit@1"].mean() == res["recall@1"]


@pytest.mark.parametrize(
    "labels, hit1, ap",
    [
        ([1, 0], 0.0, 0.5),  # tie: the negative has the lower index, so it ranks first
        ([0, 1], 1.0, 1.0),  # tie: the positive has the lower index
    ],
)
def test_ties_broken_by_gallery_index(labels, hit1, ap):
    res = retrieval_metrics_from_scores(torch.tensor([[0.5, 0.5]]), [0], labels, ks=(1,))
    assert res["recall@1"] == hit1
    assert res["map"] == pytest.approx(ap)


def test_exclude_self_hand_computed():
    # items labels [0, 0, 1]; self-similarity 1 must be ignored.
    # q0: gallery {g1 (.2, l0), g2 (.5, l1)} -> ranking g2, g1 -> hit@1 0, AP 1/2
    # q1: gallery {g0 (.2, l0), g2 (.1, l1)} -> ranking g0, g2 -> hit@1 1, AP 1
    # q2: its only same-label item is itself -> no positive, excluded
    # pairs: genuine (0,1) (1,0) = .2 .2; impostor (0,2) (1,2) (2,0) (2,1) = .5 .1 .5 .1
    #   FAR .5 : k = 2, impostors desc [.5 .5 .1 .1] -> t = .1 -> TAR 1
    #   FAR .25: k = 1 -> t = .5 -> TAR 0;   FAR .1 < 1/4 -> unsupported
    # leave-identity-out: non-mate scores q0 .5, q1 .1, q2 max(.5, .1) = .5; mated = q0, q1
    #   FPIR .5: k = 1 (1/3 <= .5 < 2/3), desc [.5 .5 .1] -> t = .5; q0's rank-1 is wrong and
    #   q1's is right but .2 <= .5 -> TPIR 0.  FPIR 1: t = -inf -> TPIR 1/2
    S = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.1], [0.5, 0.1, 1.0]], dtype=torch.float64)
    res = retrieval_metrics_from_scores(
        S, [0, 0, 1], [0, 0, 1], ks=(1, 5), exclude_self=True, far_targets=(0.5, 0.25, 0.1), fpir_targets=(1.0, 0.5)
    )
    assert res["recall@1"] == pytest.approx(0.5)
    assert res["recall@5"] == pytest.approx(1.0)
    assert res["map"] == pytest.approx(0.75)
    assert res["n_queries_without_positive"] == 1
    assert (res["n_genuine_pairs"], res["n_impostor_pairs"]) == (2, 4)
    assert res["tar@far=5e-01"] == 1.0 and res["tar@far=2e-01"] == 0.0
    assert "tar@far=1e-01" not in res and res["smallest_far_supported"] == 0.25
    assert (res["n_mated_probes"], res["n_nonmated_probes"]) == (2, 3)
    assert res["tpir@fpir=5e-01"] == 0.0 and res["tpir@fpir=1e+00"] == 0.5


def test_tar_hand_computed():
    # one query (label 0); genuine scores .95 .85 .5; impostors .9 .8 ... .0 (10 of them)
    #   FAR .5 : k = 5 -> t = .4 -> all 3 genuine above -> TAR 1
    #   FAR .1 : k = 1 -> t = .8 -> .95 .85 above      -> TAR 2/3
    #   FAR .01 < 1/10 -> unsupported, absent
    imp = [i / 10 for i in range(9, -1, -1)]
    S = torch.tensor([[0.95, 0.85, 0.5] + imp], dtype=torch.float64)
    res = retrieval_metrics_from_scores(S, [0], [0, 0, 0] + [1] * 10, far_targets=(0.5, 0.1, 0.01), fpir_targets=())
    assert res["tar@far=5e-01"] == 1.0
    assert res["tar@far=1e-01"] == pytest.approx(2 / 3)
    assert "tar@far=1e-02" not in res
    assert res["smallest_far_supported"] == 0.1
    assert res["smallest_fpir_supported"] is None


def test_tar_threshold_ties_are_strict():
    # impostors .5 .5 .5 .1, genuine .5 .6; FAR .5 -> k = 2 -> t = .5 (nothing above it),
    # and a genuine score equal to t is not accepted -> TAR 1/2.
    S = torch.tensor([[0.5, 0.6, 0.5, 0.5, 0.5, 0.1]], dtype=torch.float64)
    res = retrieval_metrics_from_scores(S, [0], [0, 0, 1, 1, 1, 1], far_targets=(0.5,))
    assert res["tar@far=5e-01"] == 0.5


def test_far_budget_is_exact_in_floating_point():
    # 100 impostors .00 .. .99 and one genuine at .705. FAR .29 allows 29 impostors above the
    # threshold (29/100 <= .29) -> t = .70 -> TAR 1. floor(.29 * 100) = 28 would give t = .71.
    S = torch.tensor([[0.705] + [i / 100 for i in range(100)]], dtype=torch.float64)
    res = retrieval_metrics_from_scores(S, [0], [0] + [1] * 100, far_targets=(0.29,))
    assert res["tar@far=3e-01"] == 1.0


def test_tpir_open_set_hand_computed():
    # gallery labels [0, 1, 2]; probes 0-2 mated, 3-4 non-mated (identities 5, 6)
    # p0: rank-1 g0 (l0) .9 correct;  p1: rank-1 g0 (.6) wrong;  p2: rank-1 g2 (.7) correct
    # non-mate (top) scores: p3 .8, p4 .65 -> FPIR .5: k = 1 -> t = .65 -> p0, p2 -> TPIR 2/3
    # FPIR 1: t = -inf -> 2/3 (rank-1 accuracy); FPIR .1 < 1/2 -> unsupported
    S = torch.tensor(
        [[0.9, 0.1, 0.2], [0.6, 0.5, 0.1], [0.1, 0.2, 0.7], [0.8, 0.3, 0.2], [0.1, 0.65, 0.0]], dtype=torch.float64
    )
    mask = np.array([False, False, False, True, True])
    res = retrieval_metrics_from_scores(
        S, [0, 1, 2, 5, 6], [0, 1, 2], nonmated_query_mask=mask, fpir_targets=(1.0, 0.5, 0.1)
    )
    assert (res["n_mated_probes"], res["n_nonmated_probes"]) == (3, 2)
    assert res["tpir@fpir=5e-01"] == pytest.approx(2 / 3)
    assert res["tpir@fpir=1e+00"] == pytest.approx(2 / 3)
    assert "tpir@fpir=1e-01" not in res and res["smallest_fpir_supported"] == 0.5


def test_tpir_nonmated_mask_is_trusted():
    # p1 is flagged non-mated although label 1 is in the gallery: its non-mate score is its top
    # score over the WHOLE gallery (.95), not over other identities (.2).
    # non-mate scores .95 .5 .4; FPIR .5: k = 1 -> t = .5; mated p0 (rank-1 g0, .45) fails.
    # (Leave-identity-out scores .5 .4 .2 would give t = .4 and TPIR 1.)
    S = torch.tensor([[0.45, 0.1], [0.2, 0.95], [0.5, 0.3], [0.1, 0.4]], dtype=torch.float64)
    res = retrieval_metrics_from_scores(
        S, [0, 1, 7, 8], [0, 1], fpir_targets=(0.5,), nonmated_query_mask=[False, True, True, True]
    )
    assert (res["n_mated_probes"], res["n_nonmated_probes"]) == (1, 3)
    assert res["tpir@fpir=5e-01"] == 0.0


def test_tpir_leave_identity_out_hand_computed():
    # gallery labels [0, 0, 1]; q0 (l0): rank-1 g0 .9 correct, non-mate = max over l1 = .5
    # q1 (l1): rank-1 g0 .6 wrong, non-mate = max(.6, .2) = .6
    # FPIR .5: k = 1, non-mates desc [.6 .5] -> t = .5 -> q0 (.9 > .5) -> TPIR 1/2
    S = torch.tensor([[0.9, 0.3, 0.5], [0.6, 0.2, 0.4]], dtype=torch.float64)
    res = retrieval_metrics_from_scores(S, [0, 1], [0, 0, 1], fpir_targets=(0.5,))
    assert (res["n_mated_probes"], res["n_nonmated_probes"]) == (2, 2)
    assert res["tpir@fpir=5e-01"] == 0.5


def test_supported_rate_filtering_drops_tiny_far():
    # 400 x 400 pairs, ~40 labels -> ~156k impostor pairs: 1e-6 needs >= 1e6 pairs -> dropped,
    # 1e-5 (>= 1/156k) kept; with min_count=10 only FAR >= 10/156k ~ 6.4e-5 survives.
    gen = torch.Generator().manual_seed(3)
    q, g = torch.randn(400, 8, generator=gen), torch.randn(400, 8, generator=gen)
    ql = torch.randint(0, 40, (400,), generator=gen)
    gl = torch.randint(0, 40, (400,), generator=gen)
    res = retrieval_metrics(q, ql, g, gl)
    n_imp = res["n_impostor_pairs"]
    assert 1e5 < n_imp < 1e6 and res["n_genuine_pairs"] + n_imp == 400 * 400
    assert [k for k in res if k.startswith("tar@")] == [
        "tar@far=1e-01",
        "tar@far=1e-02",
        "tar@far=1e-03",
        "tar@far=1e-04",
        "tar@far=1e-05",
    ]
    assert res["smallest_far_supported"] == 1e-5
    # 400 non-mated probes (leave-identity-out) support FPIR down to 1/400 = 2.5e-3
    assert [k for k in res if k.startswith("tpir@")] == ["tpir@fpir=1e-01", "tpir@fpir=1e-02"]
    assert res["smallest_fpir_supported"] == 1e-2
    res10 = retrieval_metrics(q, ql, g, gl, min_count=10)
    assert "tar@far=1e-05" not in res10 and res10["smallest_far_supported"] == 1e-4
    assert res10["tar@far=1e-04"] == res["tar@far=1e-04"]


def test_no_positives_anywhere_gives_nan_not_crash():
    S = torch.rand(4, 5, dtype=torch.float64)
    res = retrieval_metrics_from_scores(S, [9, 9, 9, 9], [0, 1, 2, 3, 4], far_targets=(0.5,), fpir_targets=(0.5,))
    assert math.isnan(res["recall@1"]) and math.isnan(res["map"])
    assert math.isnan(res["tar@far=5e-01"])  # no genuine pairs
    assert res["n_queries_without_positive"] == 4 and res["per_query"]["ap"].size == 0
    assert res["n_mated_probes"] == 0 and math.isnan(res["tpir@fpir=5e-01"])


def test_invalid_arguments():
    S = torch.rand(3, 4)
    with pytest.raises(ValueError):
        retrieval_metrics_from_scores(S, [0, 1, 2], [0, 1, 2, 3], exclude_self=True)
    with pytest.raises(ValueError):
        retrieval_metrics_from_scores(S, [0, 1], [0, 1, 2, 3])
    with pytest.raises(ValueError):
        retrieval_metrics_from_scores(S, [0, 1, 2], [0, 1, 2, 3], nonmated_query_mask=[True])
    with pytest.raises(ValueError):
        retrieval_metrics_from_scores(S, [0, 1, 2], [0, 1, 2, 3], far_targets=(1.5,))
    with pytest.raises(ValueError):
        retrieval_metrics_from_scores(S, [0.5, 1, 2], [0, 1, 2, 3])


# ------------------------------------------------------------------------------------------
# fast code == naive reference on random data
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [1, 2])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_scores_match_reference(seed, decimals, exclude_self):
    S, ql, gl = random_case(seed, decimals=decimals, exclude_self=exclude_self)
    res = retrieval_metrics_from_scores(
        S, ql, gl, ks=KS, exclude_self=exclude_self, far_targets=FARS, fpir_targets=FPIRS
    )
    assert_matches_reference(res, S, ql, gl, exclude_self=exclude_self)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_count", [1, 3])
def test_open_set_mask_matches_reference(seed, min_count):
    S, ql, gl = random_case(seed + 10, n_q=30, foreign=0.0)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(len(ql), generator=gen) < 0.4
    ql = ql.clone()
    ql[mask] += 1000  # non-mated probes: identities absent from the gallery
    ql[~mask & (torch.rand(len(ql), generator=gen) < 0.15)] += 500  # mated without mate: a miss
    res = retrieval_metrics_from_scores(
        S, ql, gl, ks=KS, nonmated_query_mask=mask, far_targets=FARS, fpir_targets=FPIRS, min_count=min_count
    )
    assert_matches_reference(res, S, ql, gl, mask=mask.tolist(), min_count=min_count)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("exclude_self", [False, True])
def test_embeddings_match_reference(seed, exclude_self):
    gen = torch.Generator().manual_seed(100 + seed)
    n_q, n_g, d = 20, (20 if exclude_self else 33), 6
    q = torch.randn(n_q, d, generator=gen, dtype=torch.float64)
    g = q.clone() if exclude_self else torch.randn(n_g, d, generator=gen, dtype=torch.float64)
    gl = torch.randint(0, 6, (n_g,), generator=gen)
    ql = gl.clone() if exclude_self else torch.randint(0, 7, (n_q,), generator=gen)
    res = retrieval_metrics(
        q, ql, g, gl, ks=KS, exclude_self=exclude_self, far_targets=FARS, fpir_targets=FPIRS, chunk_size=7
    )
    assert_matches_reference(res, ref_cosine(q, g), ql, gl, exclude_self=exclude_self)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_one_hot_embeddings_exact_ties_match_reference(exclude_self):
    # one-hot embeddings: every cosine is exactly 0 or 1, so almost everything is tied and
    # the result depends entirely on the tie rule; labels are independent of the clusters.
    gen = torch.Generator().manual_seed(7)
    n = 25
    cq = torch.randint(0, 4, (n,), generator=gen)
    cg = cq.clone() if exclude_self else torch.randint(0, 4, (n + 5,), generator=gen)
    ql = torch.randint(0, 5, (n,), generator=gen)
    gl = ql.clone() if exclude_self else torch.randint(0, 5, (n + 5,), generator=gen)
    q = torch.nn.functional.one_hot(cq, 4).float()
    g = torch.nn.functional.one_hot(cg, 4).float()
    S = [[1.0 if a == b else 0.0 for b in cg.tolist()] for a in cq.tolist()]
    res = retrieval_metrics(q, ql, g, gl, ks=KS, exclude_self=exclude_self, far_targets=FARS, fpir_targets=FPIRS)
    assert_matches_reference(res, S, ql, gl, exclude_self=exclude_self)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunking_and_buffer_pruning_match_reference(monkeypatch, chunk_size):
    # Force the impostor buffer to prune on every chunk: the thresholds must not change.
    monkeypatch.setattr(metrics, "_IMPOSTOR_BUFFER_MIN", 1)
    S, ql, gl = random_case(5, n_q=30, n_g=40, decimals=2)
    fars = (0.2, 0.05, 0.01, 0.002)
    res = retrieval_metrics_from_scores(S, ql, gl, ks=KS, far_targets=fars, fpir_targets=FPIRS, chunk_size=chunk_size)
    assert_matches_reference(res, S, ql, gl, fars=fars)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tied", [True, False])
def test_top_scores_buffer(monkeypatch, seed, tied):
    # The pruned streaming buffer must still hold the `keep` largest values (with multiplicity)
    # after any prune, including one right at the end of the stream.
    monkeypatch.setattr(metrics, "_IMPOSTOR_BUFFER_MIN", 1)
    gen = torch.Generator().manual_seed(seed)
    stream = [
        torch.rand(int(n), generator=gen, dtype=torch.float64) for n in torch.randint(0, 40, (30,), generator=gen)
    ]
    if tied:
        stream = [torch.round(part * 50) / 50 for part in stream]
    every = sorted((x for part in stream for x in part.tolist()), reverse=True)
    keep = 37
    top = metrics._TopScores(keep)
    for part in stream:
        top.add(part)
    top._prune()
    ks = [0, 1, 5, 17, keep - 1]
    got = top.kth_largest(ks)
    assert {k: float(v) for k, v in got.items()} == {k: every[k] for k in ks}


# ------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_bootstrap_ci_contains_mean_and_is_deterministic(seed):
    x = np.random.default_rng(seed).random(500)
    mean, lo, hi = bootstrap_ci(x, seed=seed)
    assert mean == pytest.approx(x.mean(), abs=1e-15)
    assert lo < mean < hi
    assert bootstrap_ci(x, seed=seed) == (mean, lo, hi)
    assert bootstrap_ci(x, seed=seed + 1) != (mean, lo, hi)


def test_bootstrap_ci_narrows_with_more_items_and_matches_normal_theory():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (100, 1000, 10000):
        x = (rng.random(n) < 0.7).astype(float)  # 0/1 hits, like per-query recall
        mean, lo, hi = bootstrap_ci(x, n_boot=2000)
        widths[n] = hi - lo
        normal = 2 * 1.959964 * x.std() / math.sqrt(n)  # 95% normal-theory interval width
        assert widths[n] == pytest.approx(normal, rel=0.1 if n == 100 else 0.06)
    assert widths[100] > widths[1000] > widths[10000]
    # a smaller alpha gives a wider interval
    x = rng.random(300)
    _, lo90, hi90 = bootstrap_ci(x, alpha=0.10)
    _, lo99, hi99 = bootstrap_ci(x, alpha=0.01)
    assert lo99 < lo90 and hi90 < hi99


def test_paired_bootstrap_identical_is_exactly_zero():
    x = np.random.default_rng(1).random(777)
    assert paired_bootstrap_ci(x, x.copy()) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_resamples_the_same_items():
    # b = a + 3 exactly: every paired resample has difference exactly -3, while a and b on
    # their own vary a lot; independent resampling of a and b would give a wide interval.
    a = np.random.default_rng(2).integers(0, 10, 1000).astype(float)
    assert paired_bootstrap_ci(a, a + 3) == (-3.0, -3.0, -3.0)
    assert paired_bootstrap_ci(a, a + 3, seed=5) == bootstrap_ci(a - (a + 3), seed=5)
    # a small consistent improvement is detected by pairing although it is far smaller than
    # the spread of the per-item values
    rng = np.random.default_rng(3)
    base = rng.random(2000)
    mean, lo, hi = paired_bootstrap_ci(base + 0.01 + rng.normal(0, 0.01, 2000), base)
    assert 0 < lo < mean < hi
    _, lo_a, hi_a = bootstrap_ci(base)
    assert hi - lo < (hi_a - lo_a) / 5


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))
    with pytest.raises(ValueError):
        paired_bootstrap_ci(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([1.0, np.nan]))
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(3), alpha=1.5)
