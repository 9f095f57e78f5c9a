"""Retrieval and biometric-style metrics for (heterogeneous) visual search.

Queries embedded by one model are searched against a gallery embedded by another; both sets of
embeddings are L2-normalised and compared by cosine similarity. This module turns the
(query x gallery) similarity matrix into the numbers reported for a model pair:

* **Recall@K**, i.e. the cumulative match characteristic (CMC) at rank K, also called top-K
  accuracy: Phillips et al., "The FERET evaluation methodology for face-recognition algorithms",
  IEEE TPAMI 2000 (CMC curves); the "Recall@K" name follows Oh Song et al., "Deep metric learning
  via lifted structured feature embedding", CVPR 2016.
* **mAP**, the mean over queries of the average precision of the full ranked gallery: Philbin et
  al., "Object retrieval with large vocabularies and fast spatial matching", CVPR 2007; Zheng et
  al., "Scalable person re-identification: a benchmark" (Market-1501), ICCV 2015.
* **TAR@FAR**, 1:1 verification over all query x gallery pairs, and **TPIR@FPIR**, 1:N open-set
  identification, reported as in IJB-C: Maze et al., "IARPA Janus Benchmark-C: face dataset and
  protocol", ICB 2018; FPIR/FNIR as defined by NIST FRVT 1:N (Grother, Ngan & Hanaoka, NISTIR
  8271, 2019). TPIR = 1 - FNIR.
* Percentile **bootstrap** confidence intervals over queries (Efron & Tibshirani, "An Introduction
  to the Bootstrap", 1993), and a **paired** bootstrap for the difference between two systems
  evaluated on the same queries.

The similarity matrix is never materialised: queries are processed in chunks of rows, so a
10k x 10k evaluation needs memory for one chunk plus the impostor scores that a FAR threshold
needs (see :func:`retrieval_metrics`). Scores are computed in float32 (float64 if the embeddings
are float64); counts and averages are accumulated in float64. Metric values are fractions in
[0, 1]; callers multiply by 100 for display.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import HVSError

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "DEFAULT_FPIR_TARGETS",
    "MetricsError",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "retrieval_metrics",
    "retrieval_metrics_from_scores",
    "similarity",
]


class MetricsError(HVSError):
    """Input a metric cannot be computed from: wrong shapes, NaN or infinite values, empty sets,
    options out of range (a ``ValueError`` still, as before)."""


DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
DEFAULT_FPIR_TARGETS: tuple[float, ...] = (1e-1, 1e-2, 1e-3)

# Score-matrix elements per query chunk (rows = _CHUNK_ELEMENTS // n_gallery). About 4M elements
# keeps a chunk, its sort and its masks within a few hundred MB.
_CHUNK_ELEMENTS = 1 << 22
# TAR@FAR bootstrap (tar_bootstrap) serves FARs whose threshold is at most this deep among the
# impostor scores; it keeps _boot_keep(k) of them, each resample scanning ~half of that.
TAR_BOOT_MAX_RANK = 25_000


def _boot_keep(k: int) -> int:
    return 4 * (k + 1) + 4096


# Buffered impostor scores are pruned to the ones a FAR threshold can still need only once more
# than max(2 * needed, _IMPOSTOR_BUFFER_MIN) have accumulated (tests lower it to force pruning).
_IMPOSTOR_BUFFER_MIN = 1 << 20


# --------------------------------------------------------------------------------------------
# similarity
# --------------------------------------------------------------------------------------------


def _float_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is too coarse for ranking)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_embeddings(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise MetricsError(
            f"{name} must be a 2-D (N, D) tensor, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise MetricsError(f"{name} contains NaN or infinite values")


def _normalize(x: Tensor, dtype: torch.dtype) -> Tensor:
    # An all-zero row stays zero (F.normalize divides by max(norm, eps)): similarity 0 to anything.
    return F.normalize(x.to(dtype), p=2.0, dim=1)


def similarity(query_emb: Tensor, gallery_emb: Tensor) -> Tensor:
    """Cosine similarity matrix (Q, G): dot products of the L2-normalised rows.

    Embeddings are normalised here, so callers may pass raw model outputs; an all-zero row has
    similarity 0 with everything. The result is float64 if either input is float64, otherwise
    float32 (half-precision inputs are upcast so that near-ties are not manufactured by rounding).
    """
    _check_embeddings(query_emb, "query_emb")
    _check_embeddings(gallery_emb, "gallery_emb")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise MetricsError(f"embedding sizes differ: query {query_emb.shape[1]} vs gallery {gallery_emb.shape[1]}")
    dtype = _float_dtype(query_emb, gallery_emb)
    return _normalize(query_emb, dtype) @ _normalize(gallery_emb.to(query_emb.device), dtype).T


# --------------------------------------------------------------------------------------------
# retrieval metrics
# --------------------------------------------------------------------------------------------


def _labels(x: Any, n: int, name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(np.asarray(x.cpu() if isinstance(x, Tensor) else x))
    if t.dim() != 1 or t.shape[0] != n:
        raise MetricsError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise MetricsError(f"{name} must be integer labels, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _rate_key(prefix: str, rate: float) -> str:
    return f"{prefix}={rate:.0e}"


def _budget(rate: float, n: int) -> int:
    """Largest k in [0, n] with k / n <= rate, evaluated in floating point as written.

    floor(rate * n) alone is off by one when the product lands just below an integer
    (0.29 * 100 == 28.999999999999996), although 29 / 100 <= 0.29 holds.
    """
    k = min(n, max(0, int(np.floor(rate * n))))
    while k < n and (k + 1) / n <= rate:
        k += 1
    while k > 0 and k / n > rate:
        k -= 1
    return k


def _supported(targets: Sequence[float], n: int, min_count: int, what: str) -> list[tuple[float, int]]:
    """(rate, k) for each target the sample supports: rate >= min_count / n (n > 0)."""
    out = []
    for rate in targets:
        rate = float(rate)
        if not 0.0 < rate <= 1.0:
            raise MetricsError(f"{what} targets must lie in (0, 1], got {rate}")
        if n > 0 and rate >= min_count / n:
            out.append((rate, _budget(rate, n)))
    return out


def _threshold(desc: Tensor, k: int, n: int) -> Tensor | float:
    """Lowest score t with #(scores > t) <= k, given the top scores sorted descending: desc[k]."""
    return float("-inf") if k >= n else desc[k]


def _count_above(sorted_asc: Tensor, t: Tensor | float) -> int:
    """Number of entries of an ascending tensor strictly greater than t."""
    if sorted_asc.numel() == 0:
        return 0
    t = torch.as_tensor(t, dtype=sorted_asc.dtype, device=sorted_asc.device).reshape(1)
    return sorted_asc.numel() - int(torch.searchsorted(sorted_asc, t, right=True).item())


class _TopScores:
    """Keeps (at least) the `keep` largest values of a stream of scores, with multiplicity.

    Values below a running lower bound (the keep-th largest value seen so far) can never be
    among the final top `keep`, so they are dropped on arrival; the buffer is pruned with
    kthvalue when it grows past max(2 * keep, _IMPOSTOR_BUFFER_MIN). Cost is linear in the
    stream plus a selection per prune. Optional integer ``ids`` (e.g. the query of each pair)
    travel with their values.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.floor: float = float("-inf")
        self.parts: list[Tensor] = []
        self.id_parts: list[Tensor] = []
        self.size = 0

    def add(self, values: Tensor, ids: Tensor | None = None) -> None:
        if self.keep <= 0:
            return
        if self.floor != float("-inf"):
            ok = values >= self.floor
            values = values[ok]
            ids = None if ids is None else ids[ok]
        if values.numel():
            self.parts.append(values)
            if ids is not None:
                self.id_parts.append(ids)
            self.size += values.numel()
        if self.size > max(2 * self.keep, _IMPOSTOR_BUFFER_MIN):
            self._prune()

    def _prune(self) -> None:
        buf = torch.cat(self.parts)
        # keep-th largest == (n - keep + 1)-th smallest
        v = torch.kthvalue(buf, buf.numel() - self.keep + 1).values
        ok = buf >= v
        if self.id_parts:
            self.id_parts = [torch.cat(self.id_parts)[ok]]
        buf = buf[ok]
        self.floor = float(v.item())
        self.parts, self.size = [buf], buf.numel()

    def values_and_ids(self) -> tuple[Tensor, Tensor]:
        """Everything buffered (at least the top `keep`), with the ids given to :meth:`add`."""
        vals = torch.cat(self.parts) if self.parts else torch.empty(0)
        ids = torch.cat(self.id_parts) if self.id_parts else torch.empty(0, dtype=torch.int64)
        return vals, ids

    def kth_largest(self, ks: Sequence[int]) -> dict[int, Tensor]:
        """{k: the (k+1)-th largest value} (0-based rank k in descending order), k < keep.

        Largest k first, each time restricting the buffer to values >= the answer: every later
        (smaller) k has its answer among them, so the work shrinks with each target instead of
        sorting ~keep values.
        """
        out: dict[int, Tensor] = {}
        buf = torch.cat(self.parts) if self.parts else torch.empty(0)
        for k in sorted(set(ks), reverse=True):
            if not 0 <= k < buf.numel():
                raise RuntimeError(f"rank {k} outside the {buf.numel()} buffered scores")
            v = torch.kthvalue(buf, buf.numel() - k).values
            out[k] = v
            buf = buf[buf >= v]
        return out


def _embedding_chunks(query_emb: Tensor, gallery_emb: Tensor, rows: int) -> Iterator[Tensor]:
    dtype = _float_dtype(query_emb, gallery_emb)
    g = _normalize(gallery_emb.to(query_emb.device), dtype)
    for start in range(0, query_emb.shape[0], rows):
        yield _normalize(query_emb[start : start + rows], dtype) @ g.T


def _matrix_chunks(scores: Tensor, rows: int) -> Iterator[Tensor]:
    dtype = scores.dtype if scores.dtype == torch.float64 else torch.float32
    for start in range(0, scores.shape[0], rows):
        chunk = scores[start : start + rows].to(dtype)
        if not bool(torch.isfinite(chunk).all()):
            raise MetricsError("scores contain NaN or infinite values")
        yield chunk


def retrieval_metrics(
    query_emb: Tensor,
    query_labels: Tensor | np.ndarray | Sequence[int],
    gallery_emb: Tensor,
    gallery_labels: Tensor | np.ndarray | Sequence[int],
    *,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    fpir_targets: Sequence[float] = DEFAULT_FPIR_TARGETS,
    nonmated_query_mask: Tensor | np.ndarray | Sequence[bool] | None = None,
    min_count: int = 1,
    chunk_size: int | None = None,
    pair_scores: bool = False,
) -> dict[str, Any]:
    """Recall@K, mAP, TAR@FAR and TPIR@FPIR of queries searched against a gallery by cosine.

    Embeddings are L2-normalised and compared with :func:`similarity`, one chunk of queries at
    a time (``chunk_size`` rows; default about 4M score entries per chunk). The same numbers for
    a precomputed score matrix come from :func:`retrieval_metrics_from_scores`.

    Ranking. Each query ranks the gallery by similarity, descending; ties are broken by gallery
    index, ascending (a stable sort), so results are deterministic and independent of chunking.
    With ``exclude_self=True`` (query set == gallery set, row i of the queries is row i of the
    gallery; requires Q == G) item i is removed from query i's gallery: it is not ranked, not a
    positive, and not a verification pair.

    Recall@K (CMC at rank K, top-K accuracy): 1 if at least one gallery item with the query's
    label is among the first K ranked items, else 0, averaged over queries. mAP: the mean over
    queries of AP = mean, over the ranks r of the query's positives in the full ranking, of
    precision@r. Queries with no positive in the gallery (open-set or singleton identities) are
    EXCLUDED from Recall@K and mAP, since neither is defined for them; they are counted in
    ``n_queries_without_positive``. If no query has a positive, these metrics are NaN.

    TAR@FAR (1:1 verification, IJB-C style): every (query, gallery) pair is a trial; genuine if
    the labels match, impostor otherwise. For a target FAR the threshold is the lowest impostor
    score t whose fraction of impostor scores STRICTLY above t is <= FAR: with the impostor
    scores sorted descending and k the largest integer with k / n_imp <= FAR, t = sorted[k]
    (t = -inf if k >= n_imp). TAR = fraction of genuine scores strictly above t (NaN if there
    are no genuine pairs). The realised FAR at t is at most the target (less when scores tie).

    TPIR@FPIR (1:N open-set identification, IJB-C / NIST FRVT style). A mated search counts as
    a true positive identification when its rank-1 gallery item has the probe's label and the
    rank-1 score is strictly above the threshold; TPIR = true positives / mated searches
    (1 - FNIR). A non-mated search contributes its top score against gallery items of other
    identities ("non-mate score"); the threshold t comes from the non-mate scores exactly as the
    TAR threshold comes from impostor scores (fraction of non-mated searches with top score
    strictly above t <= FPIR).

    * ``nonmated_query_mask`` given (open-set data): probe i is non-mated iff the mask is True;
      its identity is assumed absent from the gallery, so its non-mate score is its top score
      against the whole gallery. All other probes are mated searches; one whose identity has no
      item in the gallery can never be identified and counts as a miss. The mask is trusted.
    * ``nonmated_query_mask`` None (closed-set data, leave-identity-out): every probe serves as
      a non-mated search, its non-mate score being its maximum similarity over gallery items
      with a DIFFERENT label (as if its identity had been removed from the gallery); every probe
      with at least one positive in the gallery also serves as a mated search against the full
      gallery. (Probes without positives cannot be mated searches and only serve as non-mated.)

    Supported rates. A rate is reported only if the number of trials supports it: FAR >=
    min_count / n_impostor_pairs and FPIR >= min_count / n_nonmated_probes, i.e. at least
    ``min_count`` impostors (non-mates) may lie above the threshold. Unsupported targets are
    absent from the result; ``smallest_far_supported`` / ``smallest_fpir_supported`` is the
    smallest reported target (None if none is).

    Memory: the threshold for the largest supported FAR needs the top k+1 impostor scores; they
    are kept in a pruned buffer (about 10-20% of the impostor scores for FAR = 0.1), plus all
    genuine scores. Everything else is per chunk.

    Returns a flat dict: ``recall@{k}`` for k in ks, ``map``, ``tar@far={far:.0e}`` and
    ``tpir@fpir={fpir:.0e}`` for supported targets (in the order given), the counts
    ``n_queries``, ``n_queries_without_positive``, ``n_genuine_pairs``, ``n_impostor_pairs``,
    ``n_mated_probes``, ``n_nonmated_probes``, ``smallest_far_supported``,
    ``smallest_fpir_supported``, and ``per_query``: numpy arrays over the queries that have a
    positive (the ones Recall@K and mAP average), for bootstrap CIs: ``query_index`` (int64,
    indices into the query set), ``hit@{k}`` (0/1 float64) and ``ap`` (float64). Their means are
    exactly the recall@k and map values.
    """
    _check_embeddings(query_emb, "query_emb")
    _check_embeddings(gallery_emb, "gallery_emb")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise MetricsError(f"embedding sizes differ: query {query_emb.shape[1]} vs gallery {gallery_emb.shape[1]}")
    n_q, n_g = query_emb.shape[0], gallery_emb.shape[0]
    rows = _chunk_rows(chunk_size, n_g)
    return _evaluate(
        _embedding_chunks(query_emb, gallery_emb, rows),
        n_q,
        n_g,
        rows,
        query_emb.device,
        query_labels,
        gallery_labels,
        ks=ks,
        exclude_self=exclude_self,
        far_targets=far_targets,
        fpir_targets=fpir_targets,
        nonmated_query_mask=nonmated_query_mask,
        min_count=min_count,
        pair_scores=pair_scores,
    )


def retrieval_metrics_from_scores(
    scores: Tensor,
    query_labels: Tensor | np.ndarray | Sequence[int],
    gallery_labels: Tensor | np.ndarray | Sequence[int],
    *,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    fpir_targets: Sequence[float] = DEFAULT_FPIR_TARGETS,
    nonmated_query_mask: Tensor | np.ndarray | Sequence[bool] | None = None,
    min_count: int = 1,
    chunk_size: int | None = None,
    pair_scores: bool = False,
) -> dict[str, Any]:
    """:func:`retrieval_metrics` for a precomputed (Q, G) score matrix (higher = more similar).

    For scores that are not cosine similarities of embeddings (re-ranked, fused, or quantised
    scores); all definitions, tie rules and outputs are those of :func:`retrieval_metrics`.
    Scores must be finite; they are used in float32 unless given as float64.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise MetricsError("scores must be a 2-D (Q, G) tensor")
    if not scores.is_floating_point():
        scores = scores.to(torch.float64)
    n_q, n_g = scores.shape
    rows = _chunk_rows(chunk_size, n_g)
    return _evaluate(
        _matrix_chunks(scores, rows),
        n_q,
        n_g,
        rows,
        scores.device,
        query_labels,
        gallery_labels,
        ks=ks,
        exclude_self=exclude_self,
        far_targets=far_targets,
        fpir_targets=fpir_targets,
        nonmated_query_mask=nonmated_query_mask,
        min_count=min_count,
        pair_scores=pair_scores,
    )


def _chunk_rows(chunk_size: int | None, n_g: int) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(1, n_g))
    if int(chunk_size) < 1:
        raise MetricsError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _evaluate(
    chunks: Iterator[Tensor],
    n_q: int,
    n_g: int,
    rows: int,
    device: torch.device,
    query_labels: Any,
    gallery_labels: Any,
    *,
    ks: Sequence[int],
    exclude_self: bool,
    far_targets: Sequence[float],
    fpir_targets: Sequence[float],
    nonmated_query_mask: Any,
    min_count: int,
    pair_scores: bool = False,
) -> dict[str, Any]:
    if n_q < 1 or n_g < 1:
        raise MetricsError(f"need at least one query and one gallery item, got Q={n_q}, G={n_g}")
    if exclude_self and n_q != n_g:
        raise MetricsError(f"exclude_self needs the query set to be the gallery set, got Q={n_q}, G={n_g}")
    if int(min_count) < 1:
        raise MetricsError(f"min_count must be >= 1, got {min_count}")
    ks = list(dict.fromkeys(int(k) for k in ks))
    if any(k < 1 for k in ks):
        raise MetricsError(f"ks must be positive, got {ks}")
    ql = _labels(query_labels, n_q, "query_labels", device)
    gl = _labels(gallery_labels, n_g, "gallery_labels", device)
    if nonmated_query_mask is not None:
        nonmated = torch.as_tensor(
            np.asarray(nonmated_query_mask.cpu() if isinstance(nonmated_query_mask, Tensor) else nonmated_query_mask)
        )
        if nonmated.shape != (n_q,):
            raise MetricsError(f"nonmated_query_mask must have shape ({n_q},), got {tuple(nonmated.shape)}")
        nonmated = nonmated.to(device=device, dtype=torch.bool)

    # Positives per query from label counts, before the pass: this fixes the pair counts, hence
    # the supported FAR targets and how many impostor scores the thresholds need.
    uniq, counts = torch.unique(gl, return_counts=True)
    at = torch.searchsorted(uniq, ql).clamp_(max=uniq.numel() - 1)
    n_pos = torch.where(uniq[at] == ql, counts[at], torch.zeros_like(counts[at]))
    if exclude_self:
        n_pos = n_pos - 1  # the query itself is a gallery item with its own label
    has_pos = n_pos > 0
    n_gen = int(n_pos.sum().item())
    n_imp = n_q * (n_g - int(exclude_self)) - n_gen

    far_sup = _supported(far_targets, n_imp, int(min_count), "FAR")
    keep = max((k + 1 for _, k in far_sup if k < n_imp), default=0)
    if pair_scores:  # room for resampled thresholds (see tar_bootstrap), for the FARs it serves
        keep = max([keep] + [min(n_imp, _boot_keep(k)) for _, k in far_sup if k <= TAR_BOOT_MAX_RANK])
    imp_top = _TopScores(keep)
    need_pairs = bool(far_sup)
    genuine_q: list[Tensor] = []

    per_q_first = torch.full((n_q,), -1, dtype=torch.int64, device=device)  # 0-based rank
    per_q_ap = torch.zeros(n_q, dtype=torch.float64, device=device)
    top1_score = torch.empty(n_q, dtype=torch.float64, device=device)
    top1_correct = torch.zeros(n_q, dtype=torch.bool, device=device)
    nonmate_score = torch.empty(n_q, dtype=torch.float64, device=device)
    genuine: list[Tensor] = []

    start = 0
    for s in chunks:
        c = s.shape[0]
        r = torch.arange(c, device=device)
        same = ql[start : start + c, None] == gl[None, :]
        pos = same
        if exclude_self:
            self_mask = torch.zeros_like(same)
            self_mask[r, r + start] = True
            s = s.masked_fill(self_mask, float("-inf"))  # ranks last, is never a positive
            pos = same & ~self_mask

        vals, order = torch.sort(s, dim=1, descending=True, stable=True)
        pos_sorted = pos.gather(1, order)
        top1_score[start : start + c] = vals[:, 0].to(torch.float64)
        top1_correct[start : start + c] = pos_sorted[:, 0]

        # AP from the positions of the positives: nonzero() lists them row by row in rank
        # order, so the j-th positive of a row (1-based) at 0-based rank p adds j / (p + 1).
        qi, rank = pos_sorted.nonzero(as_tuple=True)
        npos_row = torch.bincount(qi, minlength=c)
        first = torch.cumsum(npos_row, 0) - npos_row
        nth = torch.arange(qi.numel(), device=device) - first[qi] + 1
        prec = nth.to(torch.float64) / (rank + 1).to(torch.float64)
        ap_sum = torch.zeros(c, dtype=torch.float64, device=device).index_add_(0, qi, prec)
        got = npos_row > 0
        ap = torch.where(got, ap_sum / npos_row.clamp(min=1).to(torch.float64), ap_sum)
        per_q_ap[start : start + c] = ap
        per_q_first[start : start + c][got] = rank[first[got]]  # rank of the first positive

        # Leave-identity-out non-mate score: best match among other identities (self is -inf).
        nonmate = s.masked_fill(same, float("-inf")).amax(1)
        nonmate_score[start : start + c] = nonmate.to(torch.float64)

        if need_pairs:
            genuine.append(s[pos])
            imp = ~same  # self shares its label, so it is never an impostor
            if pair_scores:
                genuine_q.append(pos.nonzero(as_tuple=True)[0] + start)
                if imp_top.floor != float("-inf"):
                    imp = imp & (s >= imp_top.floor)
                imp_top.add(s[imp], imp.nonzero(as_tuple=True)[0] + start)
            else:
                imp_top.add(s[imp])
        start += c

    if start != n_q:
        raise RuntimeError(f"scored {start} queries, expected {n_q}")

    out: dict[str, Any] = {}
    n_with = int(has_pos.sum().item())
    first_rank = per_q_first[has_pos]
    hits = {k: (first_rank < k).to(torch.float64) for k in ks}
    ap_valid = per_q_ap[has_pos]
    nan = float("nan")
    for k in ks:
        out[f"recall@{k}"] = float(hits[k].mean().item()) if n_with else nan
    out["map"] = float(ap_valid.mean().item()) if n_with else nan

    # TAR@FAR
    if far_sup:
        if pair_scores:  # the pairs behind TAR@FAR, for resampling queries (tar_bootstrap)
            imp_vals, imp_ids = imp_top.values_and_ids()
            out["pair_scores"] = {
                "genuine_score": torch.cat(genuine).to(torch.float64).cpu().numpy() if genuine else np.empty(0),
                "genuine_query": torch.cat(genuine_q).cpu().numpy() if genuine_q else np.empty(0, np.int64),
                "impostor_top_score": imp_vals.to(torch.float64).cpu().numpy(),
                "impostor_top_query": imp_ids.cpu().numpy(),
                "impostors_per_query": (
                    torch.full((n_q,), n_g - int(exclude_self), dtype=torch.int64, device=device) - n_pos
                )
                .cpu()
                .numpy(),
                "genuine_per_query": n_pos.cpu().numpy(),
                "far": [f for f, _ in far_sup],
            }
        imp_kth = imp_top.kth_largest([k for _, k in far_sup if k < n_imp])
        gen_asc = torch.sort(torch.cat(genuine)).values if genuine else torch.empty(0)
        for far, k in far_sup:
            t = imp_kth[k] if k < n_imp else float("-inf")
            out[_rate_key("tar@far", far)] = _count_above(gen_asc, t) / n_gen if n_gen else nan

    # TPIR@FPIR
    if nonmated_query_mask is None:
        mated = has_pos
        nm_scores = nonmate_score
    else:
        mated = ~nonmated
        nm_scores = top1_score[nonmated]
    n_mated = int(mated.sum().item())
    n_nm = int(nm_scores.numel())
    fpir_sup = _supported(fpir_targets, n_nm, int(min_count), "FPIR")
    # per probe, for resampling probes (tpir_bootstrap): a mated probe's score counts only when
    # its rank-1 item is its mate, so a miss is -inf
    out["per_probe"] = {
        "mated_score": torch.where(
            top1_correct[mated], top1_score[mated], torch.full_like(top1_score[mated], float("-inf"))
        )
        .cpu()
        .numpy(),
        "nonmated_score": nm_scores.cpu().numpy(),
        "mated_query": torch.nonzero(mated).flatten().cpu().numpy(),
        "nonmated_query": (
            torch.nonzero(nonmated).flatten() if nonmated_query_mask is not None else torch.arange(n_q, device=device)
        )
        .cpu()
        .numpy(),
        "fpir": [f for f, _ in fpir_sup],
    }
    if fpir_sup:
        nm_desc = torch.sort(nm_scores, descending=True).values
        correct_scores = torch.sort(top1_score[mated & top1_correct]).values
        for fpir, k in fpir_sup:
            t = _threshold(nm_desc, k, n_nm)
            out[_rate_key("tpir@fpir", fpir)] = _count_above(correct_scores, t) / n_mated if n_mated else nan

    out["n_queries"] = n_q
    out["n_queries_without_positive"] = n_q - n_with
    out["n_genuine_pairs"] = n_gen
    out["n_impostor_pairs"] = n_imp
    out["n_mated_probes"] = n_mated
    out["n_nonmated_probes"] = n_nm
    out["smallest_far_supported"] = min((f for f, _ in far_sup), default=None)
    out["smallest_fpir_supported"] = min((f for f, _ in fpir_sup), default=None)
    per_query: dict[str, np.ndarray] = {
        "query_index": torch.nonzero(has_pos).flatten().cpu().numpy(),
    }
    for k in ks:
        per_query[f"hit@{k}"] = hits[k].cpu().numpy()
    per_query["ap"] = ap_valid.cpu().numpy()
    out["per_query"] = per_query
    return out


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------

# Index-matrix elements drawn per batch of bootstrap resamples (bounds memory for big n).
_BOOT_ELEMENTS = 1 << 23


def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise MetricsError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise MetricsError(f"{name} contains NaN or infinite values")
    return a


def _percentile_ci(x: np.ndarray, n_boot: int, alpha: float, seed: int) -> tuple[float, float, float]:
    if int(n_boot) < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise MetricsError(f"alpha must lie in (0, 1), got {alpha}")
    n_boot = int(n_boot)
    n = x.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    step = max(1, _BOOT_ELEMENTS // n)
    for b0 in range(0, n_boot, step):
        b1 = min(n_boot, b0 + step)
        idx = rng.integers(0, n, size=(b1 - b0, n))
        means[b0:b1] = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(x.mean()), float(lo), float(hi)


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-item values and its percentile bootstrap CI.

    Items (e.g. the per-query ``hit@1`` or ``ap`` arrays of :func:`retrieval_metrics`) are
    resampled with replacement ``n_boot`` times; lo/hi are the alpha/2 and 1 - alpha/2 quantiles
    of the resampled means. The query set is treated as the sample, which is the uncertainty a
    reader needs when comparing numbers on the same benchmark. Deterministic for a given seed.
    """
    return _percentile_ci(_as_1d(values, "values"), n_boot, alpha, seed)


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean(a - b), lo, hi): percentile bootstrap CI of the difference of two paired systems.

    ``a[i]`` and ``b[i]`` must be the same item (query) under two systems; each resample draws
    the SAME item indices for both, i.e. resamples the per-item differences, so the variation
    shared by both systems (easy and hard queries) cancels and the interval is much narrower
    than comparing two independent CIs. A CI excluding 0 indicates a difference at level alpha.
    Identical inputs give exactly (0.0, 0.0, 0.0).
    """
    a = _as_1d(a, "a")
    b = _as_1d(b, "b")
    if a.shape != b.shape:
        raise MetricsError(f"a and b must be paired (same length), got {a.size} and {b.size}")
    return _percentile_ci(a - b, n_boot, alpha, seed)


# --------------------------------------------------------------------------------------------
# bootstrap of threshold metrics (TPIR@FPIR, TAR@FAR)
# --------------------------------------------------------------------------------------------
#
# TPIR and TAR are not means of per-query values: the threshold itself comes from the data, so
# each resample recomputes it. A resample is a vector of multiplicities (how often each query
# was drawn); the same multiplicities applied to two systems give their paired difference.


def resample_weights(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) int32 multiplicities: row b counts how often each of n items was drawn in
    resample b (n draws with replacement). Deterministic for a given seed."""
    if n < 1 or n_boot < 1:
        raise MetricsError(f"need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, n), dtype=np.int32)
    step = max(1, _BOOT_ELEMENTS // n)
    for b0 in range(0, n_boot, step):
        rows = min(n_boot, b0 + step) - b0
        idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        out[b0 : b0 + rows] = np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n)
    return out


def _budgets(rate: float, n: np.ndarray) -> np.ndarray:
    return np.array([_budget(rate, int(x)) for x in n], dtype=np.int64)


def _weighted_thresholds(
    scores: np.ndarray, owner: np.ndarray, weights: np.ndarray, k: np.ndarray, complete: bool
) -> np.ndarray:
    """Per resample b, the score at 0-based rank k[b] of the descending list in which score i
    appears weights[b, owner[i]] times (``_threshold`` with multiplicities): -inf when k[b] is
    past the end of a complete list, NaN when the list is only the top of the scores and too
    short."""
    order = np.argsort(-scores, kind="stable")
    desc, own = scores[order], owner[order]
    out = np.empty(weights.shape[0], dtype=np.float64)
    n = desc.size
    rows = max(1, min(64, (1 << 22) // max(n, 1)))  # resamples per block: bounds the (rows, n) cumsum
    for b0 in range(0, weights.shape[0], rows):
        w = weights[b0 : b0 + rows][:, own]
        cs = np.cumsum(w, axis=1, dtype=np.int64)
        kb = k[b0 : b0 + rows]
        pos = (cs <= kb[:, None]).sum(axis=1)
        t = desc[np.minimum(pos, max(n - 1, 0))] if n else np.full(pos.shape, -np.inf)
        out[b0 : b0 + rows] = np.where(pos < n, t, -np.inf if complete else np.nan)
    return out


def tpir_bootstrap(per_probe: dict, fpir: float, weights: np.ndarray) -> np.ndarray:
    """TPIR@FPIR under each resample of the queries: ``weights`` (n_boot, n_queries) from
    :func:`resample_weights`; ``per_probe`` is the ``per_probe`` entry of :func:`retrieval_metrics`.
    A query drawn m times counts m times in each of its roles (mated and/or non-mated search: with
    leave-identity-out, closed-set data, a probe is both). Rows of all-ones weights give the point
    estimate exactly."""
    ms = np.asarray(per_probe["mated_score"], dtype=np.float64)
    nm = np.asarray(per_probe["nonmated_score"], dtype=np.float64)
    mq, nq = np.asarray(per_probe["mated_query"]), np.asarray(per_probe["nonmated_query"])
    if mq.size != ms.size or nq.size != nm.size:
        raise MetricsError("per_probe arrays disagree in length")
    if (mq.size and mq.max() >= weights.shape[1]) or (nq.size and nq.max() >= weights.shape[1]):
        raise MetricsError(f"weights cover {weights.shape[1]} queries, the probes index more")
    out = np.full(weights.shape[0], np.nan)
    if not ms.size or not nm.size:
        return out
    w_m, w_n = weights[:, mq], weights[:, nq]
    k = _budgets(fpir, w_n.sum(axis=1))
    t = _weighted_thresholds(nm, np.arange(nm.size), w_n, k, complete=True)
    hits = ms[None, :] > t[:, None]
    n_m = w_m.sum(axis=1)
    ok = n_m > 0
    out[ok] = (w_m[ok] * hits[ok]).sum(axis=1) / n_m[ok]
    return out


def tar_bootstrap(pair_scores: dict, far: float, weights: np.ndarray) -> np.ndarray:
    """TAR@FAR under each resample of the queries (``weights`` (n_boot, n_queries) from
    :func:`resample_weights`): a query drawn m times brings m copies of all its genuine and
    impostor pairs. ``pair_scores`` is the entry :func:`retrieval_metrics` returns with
    ``pair_scores=True`` (all genuine scores, the top impostor scores, with their queries).

    Only the impostor scores a resample's threshold can reach are scanned: the top ~4(k+1) for a
    threshold k deep. A resample whose threshold falls below the kept scores (its queries hold
    too few of them) is NaN, never a guess; :func:`percentile_interval` then gives no interval.
    All-ones weights give the point estimate exactly."""
    imp_per_q = np.asarray(pair_scores["impostors_per_query"], dtype=np.int64)
    gen_per_q = np.asarray(pair_scores["genuine_per_query"], dtype=np.int64)
    if weights.shape[1] != imp_per_q.size:
        raise MetricsError(f"weights cover {weights.shape[1]} queries, the pairs {imp_per_q.size}")
    imp, imp_q = pair_scores["impostor_top_score"], pair_scores["impostor_top_query"]
    gen, gen_q = pair_scores["genuine_score"], pair_scores["genuine_query"]
    n_imp_all = int(imp_per_q.sum())
    n_boot = weights.shape[0]
    out = np.full(n_boot, np.nan)
    n_imp = weights @ imp_per_q
    n_gen = weights @ gen_per_q
    k = _budgets(far, n_imp)
    keep = _boot_keep(_budget(far, n_imp_all))
    if imp.size > keep:  # the top `keep` (ties included): all a resampled threshold can need
        cut = np.partition(imp, imp.size - keep)[imp.size - keep]
        sel = imp >= cut
        imp, imp_q = imp[sel], imp_q[sel]
    t = _weighted_thresholds(imp, imp_q, weights, k, complete=imp.size >= n_imp_all)
    t = np.where(k >= n_imp, -np.inf, t)  # every impostor may pass: no threshold
    ok = ~np.isnan(t) & (n_gen > 0)
    if not ok.any() or not gen.size:
        return out
    # genuine pairs of query q strictly above each distinct threshold, from one pass over them
    ts = np.unique(t[ok])
    r = np.searchsorted(ts, gen, side="left")  # thresholds strictly below each genuine score
    hist = np.zeros((imp_per_q.size, ts.size + 1), dtype=np.int64)
    np.add.at(hist, (gen_q, r), 1)
    above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # above[q, j] = #gen of q > ts[j]
    j = np.searchsorted(ts, t[ok])
    out[ok] = (weights[ok] * above[:, j].T).sum(axis=1) / n_gen[ok]
    return out


def percentile_interval(values: np.ndarray, alpha: float = 0.05) -> list[float] | None:
    """[lo, hi] percentile interval of bootstrap replicates; None when any replicate is NaN
    (dropping them would bias the interval: they are not missing at random)."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size or np.isnan(v).any():
        return None
    lo, hi = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return [float(lo), float(hi)]
