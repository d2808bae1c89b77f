"""Datasets: a registry of image sources, and WebDataset shards written from them."""

from bench_suite.data.registry import dataset_names, get_dataset  # noqa: F401
