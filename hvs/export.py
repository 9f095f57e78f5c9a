"""Export a model folder to ONNX for on-device query embedding, with a parity check.

    from hvs.export import export_onnx
    from hvs.search import Searcher

    report = export_onnx("runs/query-bct", "q.onnx", quantize_int8=True)   # also writes q.int8.onnx
    report["parity"]["max_abs_diff"]      # ONNX Runtime vs PyTorch, checked <= 1e-4
    Searcher("faiss:runs/index", "q.onnx")                                  # same refusal rules

The exported graph is the eval-mode :class:`~hvs.models.EmbeddingModel` (BatchNorm folded, L2
normalisation inside) with a dynamic batch axis: input ``images`` float32 (N, C, H, W) already
normalised as ``(x / 255 - mean) / std``, output ``embeddings`` float32 (N, D) of unit length.
Everything a search service needs to trust the file travels in its ``metadata_props`` (JSON
strings): ``preprocessing`` (channels, image_size, mean, std), ``embed_dim``, ``model``, ``role``,
``fingerprint`` (of the PyTorch weights it came from), ``compatible_with`` (the gallery model's
fingerprint) and ``weights_sha256`` (of the graph itself, verified when the file is loaded), so an
``.onnx`` query encoder is refused by an index built by another gallery model exactly as its model
folder would be (:func:`hvs.compat.check_pair`), and an altered file is refused by name. Reading
and running exports (ONNX Runtime sessions, metadata, latency) is :mod:`hvs.encoders`' job; this
module only writes files.

Why these choices (measured on this repo's models with torch 2.14 / onnxruntime 1.32, 2 CPU cores):

* **Exporter**: ``torch.onnx.export(dynamo=True)``, torch's default and supported path (the
  TorchScript exporter is deprecated since torch 2.9). It is slower to run (2-8 s vs 0.1 s per
  model) but folds BatchNorm into the convolutions / Gemm and gives smaller graphs (17 vs 22 nodes
  for cnn-nano); parity is ~2e-7 either way. The TorchScript exporter is kept as a fallback for a
  model ``torch.export`` cannot trace; the report says which one ran.
* **Opset 18** by default: ONNX Runtime >= 1.14, the quantization tools and other runtimes
  (TensorRT, OpenVINO, onnxruntime-web) all run it; 20 (torch's default) gains nothing for
  convolution nets and excludes older runtimes.
* **Parity** is checked on random uint8 images through the real preprocessing, at batch 1 and 5
  (which also proves the batch axis is dynamic); the file is written atomically only after the
  check passes, so a failed export never leaves a file behind.
* **int8**: *static* quantization (QDQ format, per-channel int8 weights, uint8 activations,
  MinMax calibration on 64 training images). Dynamic quantization turns convolutions into
  ConvInteger (a slow reference kernel in ONNX Runtime's CPU provider) and re-measures every
  activation's range on every run; QDQ is the format ONNX Runtime fuses into QLinearConv on
  x86/ARM, with ranges fixed once from real images. The int8 file carries the same metadata and loads the same way.
  Measured (28 px input, 2 threads): 3-3.6x smaller files and embeddings within cosine 0.9999 of
  fp32, but speed depends on the architecture: dense convolutions gain (resnet8 2.4x, cnn-small
  1.3x at batch 64) while depthwise nets lose (mobilenetv3_small 3x, shufflenetv2 1.6x slower at
  batch 64; ORT's int8 depthwise kernels are weak); at batch 1 all are within +-30%. Measure
  yours with ``hvs export onnx --int8 --check-data SPEC``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .compat import GallerySide, check_pair
from .data.images import to_float

# The ONNX Runtime side (sessions, metadata, the query encoder, latency) lives in hvs.encoders;
# its public names are re-exported here for callers that import them from hvs.export.
from .encoders import (
    INPUT,
    OUTPUT,
    WEIGHTS_KEY,
    graph_sha256,
    import_onnx,
    load_onnx_encoder,
    load_query_encoder,
    measure_ort_latency,
    ort_session,
    read_metadata,
)
from .errors import ExportError

DEFAULT_OPSET = 18
PARITY_TOL = 1e-4  # max |ONNX - torch| over embedding coordinates (unit vectors; fp32 gives ~1e-7)
EXPORT_FORMAT = "hvs-onnx/1"


def int8_path_for(out_path: str | os.PathLike) -> Path:
    """``q.onnx`` -> ``q.int8.onnx``: where the int8 copy of an export goes by default."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.int8{out.suffix or '.onnx'}")


# ----------------------------------------------------------------------------------------------
# Export.
@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and the quantizer's chatter (warnings, root-logger WARNINGs)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _torch_export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """Write ``model`` to ``path``; returns which exporter ran ("dynamo" or "torchscript")."""
    errors = []
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                opset_version=opset,
                dynamo=True,
                verbose=False,
                external_data=False,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1 << 16)}},
            )
        return "dynamo"
    except Exception as e:  # torch.export cannot trace every model: try the TorchScript exporter
        errors.append(f"dynamo: {' '.join(str(e).split())[:200]}")
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
        return "torchscript"
    except Exception as e:
        errors.append(f"torchscript: {' '.join(str(e).split())[:200]}")
    raise ExportError(f"ONNX export at opset {opset} failed ({'; '.join(errors)})")


def _set_metadata(proto, card: ckpt.ModelCard, extra: dict | None = None) -> None:
    values = {
        "preprocessing": {
            "channels": card.in_chans,
            "image_size": card.image_size,
            "mean": list(card.mean),
            "std": list(card.std),
        },
        "embed_dim": card.embed_dim,
        "model": card.model,
        "role": card.role,
        "fingerprint": card.fingerprint,
        "compatible_with": (card.compatible_with or {}).get("fingerprint"),
        "hvs_format": EXPORT_FORMAT,
        "io": {
            "input": f"{INPUT}: float32 (N, C, H, W), (x / 255 - mean) / std",
            "output": f"{OUTPUT}: float32 (N, D), L2-normalised",
        },
        **(extra or {}),
        WEIGHTS_KEY: graph_sha256(proto),  # the graph is final here: loading verifies this digest
    }
    keep = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for p in keep:
        proto.metadata_props.add(key=p.key, value=p.value)
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    proto.doc_string = (
        f"hvs {card.role} model {card.model} (fingerprint {card.fingerprint}); "
        f"input {INPUT} (N, {card.in_chans}, {card.image_size}, {card.image_size}) "
        "normalised as (x/255-mean)/std, output L2-normalised embeddings"
    )


def _agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


def _random_images(card: ckpt.ModelCard, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *card.input_shape), generator=g, dtype=torch.uint8)


def export_onnx(
    model_folder: str | os.PathLike,
    out_path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    quantize_int8: bool = False,
    *,
    int8_path: str | os.PathLike | None = None,
    calibration_data: str | None = None,
    calibration_images: int = 64,
    tol: float = PARITY_TOL,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a model folder to ONNX at ``out_path`` after checking parity with PyTorch.

    Raises :class:`ExportError` (and writes nothing) if the checker rejects the graph or ONNX
    Runtime's embeddings differ from PyTorch's by more than ``tol`` at batch 1 or 5. With
    ``quantize_int8`` a statically quantized copy goes to ``int8_path`` (default ``q.int8.onnx``
    next to ``q.onnx``), calibrated on ``calibration_images`` training images of
    ``calibration_data`` (default: the data the model was trained on, from its config.json); its
    agreement with the fp32 export is measured on held-out (query split) images and reported,
    not enforced. Returns a JSON-able report: paths, opset, exporter, sizes, parity, int8.
    """
    onnx, _ = import_onnx()
    started = time.perf_counter()
    out = Path(out_path)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"output {out} must end in .onnx (the suffix selects the ONNX query-encoder loader)")
    if out.is_dir():
        raise ExportError(f"output {out} is a folder")
    supported = range(7, getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 23) + 1)
    if opset not in supported:
        raise ExportError(
            f"opset {opset} is not supported by torch {torch.__version__} "
            f"(use {supported.start}..{supported.stop - 1}; default {DEFAULT_OPSET})"
        )
    model, card = ckpt.load_model(model_folder)
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    example = to_float(_random_images(card, 2, seed), card.mean, card.std)

    with tempfile.TemporaryDirectory(prefix="hvs-export-") as tmp:
        if card.adopted.get("kind") == "onnx":  # an adopted ONNX encoder: its own graph, L2-normalised
            proto, exporter = _normalised_graph(onnx.load(str(Path(model_folder) / ckpt.ADOPTED_ONNX))), "adopted"
        else:
            raw_path = Path(tmp) / "model.onnx"
            exporter = _torch_export(model, example, raw_path, opset)
            proto = onnx.load(str(raw_path))
        _set_metadata(proto, card)
        data = proto.SerializeToString()
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:
            raise ExportError(f"exported graph fails onnx.checker ({' '.join(str(e).split())[:300]})") from None
        session = ort_session(data)
        parity = _parity(model, session, card, seed)
        parity["tol"] = tol
        if not parity["max_abs_diff"] <= tol:  # also catches NaN
            raise ExportError(
                f"ONNX Runtime and PyTorch embeddings differ by {parity['max_abs_diff']:.2e} "
                f"(> {tol:.0e}) for {card.model}; nothing written"
            )
        ckpt.atomic_write_bytes(out, data)
    report: dict[str, Any] = {
        "model": card.model,
        "role": card.role,
        "model_folder": str(model_folder),
        "onnx": str(out),
        "opset": opset,
        "exporter": exporter,
        "input": [None, *card.input_shape],
        "embed_dim": card.embed_dim,
        "fingerprint": card.fingerprint,
        "compatible_with": (card.compatible_with or {}).get("fingerprint"),
        "parity": parity,
        "size_bytes": {"torch": _weights_file(model_folder, card).stat().st_size, "onnx": out.stat().st_size},
    }
    if quantize_int8:
        q_out = Path(int8_path) if int8_path is not None else int8_path_for(out)
        report["int8"] = quantize_onnx_int8(
            out, q_out, card, calibration_data=calibration_data, calibration_images=calibration_images, seed=seed
        )
        report["size_bytes"]["int8"] = q_out.stat().st_size
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _weights_file(folder: str | os.PathLike, card: ckpt.ModelCard) -> Path:
    return Path(folder) / (ckpt.ADOPTED_ONNX if card.adopted.get("kind") == "onnx" else ckpt.WEIGHTS)


def _normalised_graph(proto):
    """An adopted ONNX encoder's graph with its output L2-normalised (``LpNormalization``, p=2,
    last axis) and named ``embeddings``, as an hvs export's is: the folder's module normalises in
    torch, the exported file must give the same unit vectors."""
    import onnx

    inits = {i.name for i in proto.graph.initializer}
    inp = next(i for i in proto.graph.input if i.name not in inits)
    batch = inp.type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value"):
        raise ExportError(
            f"the adopted ONNX encoder has a fixed batch of {batch.dim_value} (input {inp.name!r}); an export needs "
            "a dynamic batch axis: export the encoder again with one"
        )
    out = proto.graph.output[0]
    raw = f"{out.name}_unnormalised"
    for node in proto.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    proto.graph.node.append(onnx.helper.make_node("LpNormalization", [raw], [OUTPUT], axis=-1, p=2))
    out.name = OUTPUT
    return proto


@torch.inference_mode()
def _parity(model: torch.nn.Module, session, card: ckpt.ModelCard, seed: int) -> dict[str, Any]:
    images = _random_images(card, 5, seed + 1)
    x = to_float(images, card.mean, card.std)
    name = session.get_inputs()[0].name
    want = model(x).numpy()
    got5 = session.run(None, {name: x.numpy()})[0]
    got1 = session.run(None, {name: x[:1].numpy()})[0]
    if got5.shape != want.shape or got1.shape != want[:1].shape:
        raise ExportError(
            f"ONNX output shapes {got1.shape}/{got5.shape} differ from PyTorch's {want[:1].shape}/{want.shape}"
        )
    agree = _agreement(np.concatenate([got1, got5]), np.concatenate([want[:1], want]))
    return {**agree, "batch_sizes": [1, 5]}


def _calibration_split(card: ckpt.ModelCard, spec: str | None, protocol: str | None):
    from .data import create_dataset

    spec = spec or card.extra.get("data")
    if not spec:
        raise ExportError(
            "int8 calibration needs images: the model's config.json records no training data, "
            "pass calibration_data=SPEC (--calib-data)"
        )
    protocol = protocol or card.extra.get("protocol") or "closed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped unreadable items are irrelevant to calibration
        return create_dataset(spec, protocol=protocol, image_size=card.image_size, channels=card.in_chans), spec


def quantize_qdq(src: str | os.PathLike, dst: str | os.PathLike, reader: Any) -> None:
    """hvs's one int8 recipe: static QDQ quantization of ``src`` into ``dst``, int8 per-channel weights,
    uint8 activations, MinMax calibration on the batches ``reader`` (an ORT ``CalibrationDataReader``)
    yields. Used by :func:`quantize_onnx_int8` and by the int8 latency tables of the search."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet():
        quantize_static(
            str(src),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )


def quantize_onnx_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    card: ckpt.ModelCard | None = None,
    *,
    calibration_data: str | None = None,
    protocol: str | None = None,
    calibration_images: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Statically quantize an hvs ONNX export to int8 (QDQ, per-channel weights, MinMax).

    Calibrates on ``calibration_images`` training images (seeded choice) and measures agreement
    with the fp32 file on up to 256 query-split images it was not calibrated on. Written
    atomically with the same metadata plus a ``quantization`` entry. Returns the report."""
    onnx, _ = import_onnx()
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out = Path(fp32_path), Path(out_path)
    meta = read_metadata(fp32_path)
    pre = meta["preprocessing"]
    if card is None:
        card = ckpt.ModelCard(
            model=meta["model"],
            embed_dim=meta["embed_dim"],
            in_chans=pre["channels"],
            image_size=pre["image_size"],
            mean=pre["mean"],
            std=pre["std"],
            role=meta["role"],
            fingerprint=meta["fingerprint"],
            compatible_with={"fingerprint": meta["compatible_with"]} if meta["compatible_with"] else None,
        )
    data, spec = _calibration_split(card, calibration_data, protocol)
    g = torch.Generator().manual_seed(seed)
    n = max(1, min(int(calibration_images), len(data.train)))
    calib = to_float(data.train.images[torch.randperm(len(data.train), generator=g)[:n]], card.mean, card.std).numpy()
    held_out = to_float(data.query.images[:256], card.mean, card.std).numpy()
    batch = 16

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT: calib[i : i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="hvs-int8-") as tmp, _quiet():
        prepped, quant = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # ONNX shape inference + ORT graph optimisation; ORT's symbolic shape inference cannot
        # follow the Expand of the L2 normalisation, and static shapes are all it would add here.
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        quantize_qdq(prepped, quant, _Reader())
        proto = onnx.load(str(quant))
    method = {
        "format": "QDQ",
        "weights": "int8 per-channel",
        "activations": "uint8",
        "calibration": {"method": "minmax", "data": spec, "split": "train", "images": n},
    }
    _set_metadata(proto, card, {"quantization": method})
    blob = proto.SerializeToString()
    ref = ort_session(fp32_path).run(None, {INPUT: held_out})[0]
    got = ort_session(blob).run(None, {INPUT: held_out})[0]
    ckpt.atomic_write_bytes(out, blob)
    return {
        "path": str(out),
        **method,
        "agreement": {**_agreement(got, ref), "images": len(held_out), "on": f"{spec} query split (held out)"},
    }


# ----------------------------------------------------------------------------------------------
# Measured effect of the export on retrieval and latency.
def check_export(
    report: dict[str, Any],
    gallery_model: str | os.PathLike,
    data: str,
    *,
    protocol: str = "closed",
    latency: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """M(q->g) Recall@1/mAP and batch-1 latency of the torch query model and of its ONNX (and
    int8) exports, on ``data``'s query split against its gallery split embedded by
    ``gallery_model``. Returns ``{"rows": {"torch"|"onnx"|"int8": {...}}, "note": ...}``."""
    from .data import create_dataset
    from .embed import embed_images, resize_images
    from .metrics import retrieval_metrics
    from .models.cost import measure_latency

    g_model, g_card = ckpt.load_model(gallery_model)
    encoders = {"torch": report["model_folder"], "onnx": report["onnx"]}
    if report.get("int8"):
        encoders["int8"] = report["int8"]["path"]
    gallery_side = GallerySide.of_card(g_card, gallery_model)
    loaded: dict[str, Any] = {}
    note = None
    for kind, path in encoders.items():  # each refused before the next is read and any data decoded
        loaded[kind] = load_query_encoder(path)
        note = note or check_pair(loaded[kind].side, gallery_side, force=force, action="measure")
    # decoded once, at the larger of the two sides' sizes; each side resized to its own
    size = max([g_card.image_size, *(enc.preprocessing["image_size"] for enc in loaded.values())])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = create_dataset(
            data, protocol=protocol, image_size=size, channels=g_card.in_chans, splits=("query", "gallery")
        )
    gal, query = dataset.gallery, dataset.query
    g_emb = embed_images(g_model, gal.images, g_card.mean, g_card.std, image_size=g_card.image_size)
    rows: dict[str, dict[str, Any]] = {}
    for kind, path in encoders.items():
        enc = loaded[kind]
        pre = enc.preprocessing
        q_images = resize_images(query.images, pre["image_size"])
        q_emb = torch.from_numpy(np.ascontiguousarray(enc.embed(q_images)))
        m = retrieval_metrics(q_emb, query.labels, g_emb, gal.labels, ks=(1, 5), far_targets=(), fpir_targets=())
        row = {"recall@1": float(m["recall@1"]), "recall@5": float(m["recall@5"]), "map": float(m["map"])}
        if latency:
            shape = (pre["channels"], pre["image_size"], pre["image_size"])
            if kind == "torch":
                q_model, _ = ckpt.load_model(path)
                row["latency_ms_batch1"] = measure_latency(q_model.to(memory_format=torch.channels_last), shape, 1)
            else:
                row["latency_ms_batch1"] = measure_ort_latency(ort_session(path, torch.get_num_threads()), shape, 1)
        rows[kind] = row
    return {
        "data": data,
        "protocol": protocol,
        "gallery_model": str(gallery_model),
        "n_query": len(query),
        "n_gallery": len(gal),
        "rows": rows,
        "note": note,
    }


def format_report(report: dict[str, Any], check: dict[str, Any] | None = None) -> str:
    """The export report as a few human-readable lines (what ``hvs export onnx`` prints)."""
    kb = lambda n: f"{n / 1024:.1f} KiB"  # noqa: E731
    p = report["parity"]
    sizes = report["size_bytes"]
    lines = [
        f"exported {report['role']} model {report['model']} ({report['fingerprint']}) -> {report['onnx']}",
        f"  opset {report['opset']} ({report['exporter']} exporter), input {report['input']}, "
        f"embed_dim {report['embed_dim']}, compatible_with {report['compatible_with'] or 'none'}",
        f"  parity vs PyTorch (batch {'/'.join(map(str, p['batch_sizes']))}): max |diff| {p['max_abs_diff']:.2e} "
        f"(tol {p['tol']:.0e}), min cosine {p['min_cosine']:.7f}",
        f"  size: torch weights {kb(sizes['torch'])}, onnx {kb(sizes['onnx'])}"
        + (f", int8 {kb(sizes['int8'])}" if "int8" in sizes else ""),
    ]
    if report.get("int8"):
        q = report["int8"]
        a = q["agreement"]
        lines.append(
            f"  int8 -> {q['path']}: {q['format']} {q['weights']} weights, {q['activations']} activations, "
            f"calibrated on {q['calibration']['images']} {q['calibration']['split']} images"
        )
        lines.append(
            f"  int8 vs fp32 on {a['images']} held-out images: min cosine {a['min_cosine']:.5f}, "
            f"mean {a['mean_cosine']:.5f}, max |diff| {a['max_abs_diff']:.2e}"
        )
    lines.append(f"  export took {report['seconds']:.1f} s")
    if check:
        lines.append(
            f"M(q->g) on {check['data']} ({check['n_query']} queries, {check['n_gallery']} gallery "
            f"embedded by {check['gallery_model']}):"
        )
        lines.append(f"  {'query encoder':<15}{'R@1':>8}{'R@5':>8}{'mAP':>8}{'batch-1 ms':>12}")
        for kind, row in check["rows"].items():
            lat = f"{row['latency_ms_batch1']:.3f}" if "latency_ms_batch1" in row else "-"
            lines.append(
                f"  {kind:<15}{100 * row['recall@1']:>8.2f}{100 * row['recall@5']:>8.2f}"
                f"{100 * row['map']:>8.2f}{lat:>12}"
            )
        if check.get("note"):
            lines.append(f"  note: {check['note']}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "PARITY_TOL",
    "check_export",
    "export_onnx",
    "format_report",
    "int8_path_for",
    "load_onnx_encoder",
    "measure_ort_latency",
    "ort_session",
    "quantize_onnx_int8",
    "read_metadata",
]
