"""Datasets and data pipelines: synthetic faces, Parquet shards, augmentation."""
