"""Datasets: official-format readers, offline datasets, preprocessing and the catalogue of names."""

from nws.data.catalog import (
    DATASETS,
    OFFLINE_DATASETS,
    check_available,
    dataset_identity,
    default_data_dir,
    load_images,
    resolve_datasets,
)
from nws.data.preprocess import BalancedSampler, ImageSet, NetData, split_for_net, to_rgb32

__all__ = [
    "DATASETS",
    "OFFLINE_DATASETS",
    "BalancedSampler",
    "ImageSet",
    "NetData",
    "check_available",
    "dataset_identity",
    "default_data_dir",
    "load_images",
    "resolve_datasets",
    "split_for_net",
    "to_rgb32",
]
