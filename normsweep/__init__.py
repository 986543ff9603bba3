"""normsweep: run and compare normalization experiments (Batch/Group/Layer Norm) on CIFAR-10.

Where things are:
  config.py   the config schema (dataclasses) behind conf/, and its checks
  data.py     CIFAR-10 reading (torchvision pickle or class folders), cache, splits
  augment.py  batched on-device augmentation
  models.py   the CNN family; make_norm() is where the normalization layer is chosen
  train.py    the training loop and evaluation
  results.py  what a run writes (results.json, checkpoint, predictions)
  job.py      one Hydra job, start to finish
"""

__version__ = "0.1.0"
