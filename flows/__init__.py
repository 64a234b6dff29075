"""Prefect flows: they compose tasks/ and nothing else."""
