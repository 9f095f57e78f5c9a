"""Retrieval datasets for hvs: one :class:`RetrievalData` (train / query / gallery) per source.

>>> from hvs.data import create_dataset, list_sources
>>> list_sources()
['csv', 'deepfashion2', 'fashion-mnist', 'imagefolder', 'kanji-fonts', 'synthetic']
>>> data = create_dataset("synthetic:classes=4,size=16", protocol="open")
>>> data.summary()  # doctest: +ELLIPSIS
'synthetic:classes=4,size=16 [open-set] train 128 (2 classes), query 16, gallery 16, 1x16x16'

Sources are picked by an explicit prefix (see :mod:`hvs.data.registry`):

=======================  ===================================================================
``fashion-mnist[:DIR]``  the four IDX ``.gz`` files (Debian ``dataset-fashion-mnist``)
``imagefolder:DIR``      ``DIR/<class>/<image>``, classes sorted
``csv:FILE``             manifest with columns ``path,label[,split][,bbox]``
``deepfashion2:DIR``     consumer-to-shop retrieval from the released JSON annotations
``synthetic[:K=V,...]``  procedural patterns generated in memory
``kanji-fonts[:DIR]``    JIS level-1 kanji rendered from print (gallery) / handwriting (query) fonts
=======================  ===================================================================

File sources (imagefolder, csv, deepfashion2) decode into memory when that takes at most 2 GiB
and otherwise stream from disk through DataLoader workers (``data_mode=``, ``workers=``; a
memory-mapped cache is a third choice): see :mod:`hvs.data.store`.
"""

# importing the source modules registers them
from . import csv_manifest, deepfashion2, fashion_mnist, imagefolder, kanji_fonts, synthetic  # noqa: E402,F401
from .base import SPLITS, DataError, RetrievalData, Split
from .checks import Duplicate, find_duplicates
from .images import ImageError, channel_stats, load_image, to_float
from .registry import DataWarning, create_dataset, list_sources, parse_spec, register_source, source_info, validate
from .store import DATA_MODES, ImageStore

__all__ = [
    "DATA_MODES",
    "SPLITS",
    "DataError",
    "DataWarning",
    "Duplicate",
    "ImageError",
    "ImageStore",
    "RetrievalData",
    "Split",
    "channel_stats",
    "create_dataset",
    "find_duplicates",
    "list_sources",
    "load_image",
    "parse_spec",
    "register_source",
    "source_info",
    "to_float",
    "validate",
]
