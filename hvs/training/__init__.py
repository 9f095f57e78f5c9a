"""The trainer core both trainers are made of (:func:`hvs.train.train` for models,
:func:`hvs.nas.train.train_supernet` for supernets).

- :mod:`hvs.training.run`: the run folder (config, log, checksummed checkpoint, resume rules);
- :mod:`hvs.training.core`: batches in memory, optimizer and schedule, the epoch loop made of
  short steps over a :class:`~hvs.training.core.Task`, model-folder writing;
- :mod:`hvs.training.gallery`: the frozen gallery model and the weighted compatibility losses
  (registered in :mod:`hvs.losses`) computed against it.
"""

from .core import Batches, Task, TrainError, fit, make_optimizer, read_mapping, resume, save_trained_model, train_epoch
from .gallery import CompatTerms, FrozenGallery, build_compat_terms, check_gallery_card
from .run import LOG, STATE, TRAIN_CONFIG, RunFolder, write_log

__all__ = [
    "LOG",
    "STATE",
    "TRAIN_CONFIG",
    "Batches",
    "CompatTerms",
    "FrozenGallery",
    "RunFolder",
    "Task",
    "TrainError",
    "build_compat_terms",
    "check_gallery_card",
    "fit",
    "make_optimizer",
    "read_mapping",
    "resume",
    "save_trained_model",
    "train_epoch",
    "write_log",
]
