"""The trainer core both trainers are made of (:func:`hvs.train.train` for models,
:func:`hvs.nas.train.train_supernet` for supernets): the run folder, the epoch loop and its steps,
the optimizer and schedule, and model-card writing."""

from .run import LOG, STATE, TRAIN_CONFIG, RunFolder, write_log

__all__ = ["LOG", "STATE", "TRAIN_CONFIG", "RunFolder", "write_log"]
