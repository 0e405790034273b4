"""Data: text tokenised once into memory-mapped shards, windows of `seq_len` read per rank per step.

Only light modules are imported here (numpy, no pyarrow): tokeniser worker processes import this package.
Preparing a run's data: `distill.data.prepare.prepare_datasets`.
"""

from distill.data.corpus import DataError, load_documents
from distill.data.packing import PackedDataset, pack_documents
from distill.data.sampler import StepSampler
from distill.data.shards import TrainWindows

__all__ = ["DataError", "PackedDataset", "StepSampler", "TrainWindows", "load_documents", "pack_documents"]
