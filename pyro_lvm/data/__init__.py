"""Data: named data sets and files (:mod:`.registry`), device-resident minibatches (:mod:`.loader`)."""

from .loader import DeviceBatches, iterate_in_order
from .registry import BINARIZATIONS, DATASETS, DataSplits, default_data_dir, describe_datasets, load_dataset

__all__ = ["BINARIZATIONS", "DATASETS", "DataSplits", "DeviceBatches", "default_data_dir", "describe_datasets",
           "iterate_in_order", "load_dataset"]
