"""Backing up and restoring the database: `model-registry backup` and `restore`."""
