"""Data: real text in, fixed-length token sequences out, sharded deterministically per rank."""

from distill.data.corpus import DataError, load_documents, split_documents
from distill.data.packing import PackedDataset, pack_documents
from distill.data.prepare import prepare_datasets
from distill.data.sampler import StepSampler

__all__ = [
    "DataError",
    "PackedDataset",
    "StepSampler",
    "load_documents",
    "pack_documents",
    "prepare_datasets",
    "split_documents",
]
