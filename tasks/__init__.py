"""Prefect tasks: one thin wrapper per engine call; paths and small JSON-able configs in and out, never tensors."""
