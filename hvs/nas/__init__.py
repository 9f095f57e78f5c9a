"""CMP-NAS: compatibility-aware neural architecture search for the query model.

CMP-NAS (Duggal et al., "Compatibility-aware Heterogeneous Visual Search", CVPR 2021) finds the
query architecture that is cheapest for a given accuracy *against a fixed gallery model*. It
builds on Once-for-All (Cai et al., ICLR 2020) and regularized evolution (Real et al., AAAI
2019). The pipeline, one function per step (each wrapped by an ``hvs nas`` subcommand):

1. :func:`train_supernet` -- an OFA MobileNetV3 supernet (:mod:`hvs.models.ofa`) whose
   sub-networks all learn their own margin softmax *and* the BCT influence loss through the
   frozen gallery classifier (without a gallery: a plain supernet, for weight inheritance);
2. :func:`run_search` -- regularized evolution under a FLOPs or CPU-latency budget, every
   candidate scored after BatchNorm re-calibration by M(q->g) on a validation split carved from
   the training classes (``homo``: M(q->q), the compatibility-agnostic baseline);
3. :func:`export_subnet` -- the winner as an ordinary query model folder, optionally fine-tuned
   with BCT;
4. :func:`inherit` -- weight inheritance: largest sub-network = gallery model, a smaller one =
   query model, no further training.
"""

from .common import (
    NASData,
    NASError,
    SupernetCard,
    carve_identities,
    carve_validation,
    load_supernet,
    prepare_data,
    recalibrate_bn,
)
from .export import export_subnet, inherit, largest_under_budget
from .latency import LatencyTable, compare_latency, measure_subnet_latency
from .search import (
    Budget,
    SearchConfig,
    SearchResult,
    SubnetScorer,
    check_feasible,
    get_reward,
    list_rewards,
    random_search,
    register_reward,
    regularized_evolution,
    run_search,
    sample_under_budget,
)
from .train import SupernetTrainConfig, phase_plan, train_supernet

__all__ = [
    "Budget",
    "LatencyTable",
    "NASData",
    "NASError",
    "SearchConfig",
    "SearchResult",
    "SubnetScorer",
    "SupernetCard",
    "SupernetTrainConfig",
    "carve_identities",
    "carve_validation",
    "check_feasible",
    "compare_latency",
    "export_subnet",
    "get_reward",
    "inherit",
    "largest_under_budget",
    "list_rewards",
    "load_supernet",
    "measure_subnet_latency",
    "phase_plan",
    "prepare_data",
    "random_search",
    "recalibrate_bn",
    "register_reward",
    "regularized_evolution",
    "run_search",
    "sample_under_budget",
    "train_supernet",
]
