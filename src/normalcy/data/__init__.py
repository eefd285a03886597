"""Data: sources, splits, and DVC versioning."""
