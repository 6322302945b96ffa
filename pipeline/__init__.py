"""Machinery shared by the offline stages: manifests, the run layout, atomic I/O, shards, Ray."""
__version__ = "0.1.0"
