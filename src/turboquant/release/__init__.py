"""Shipping artifacts: Hub publishing, model cards, release keys, the watch list, reproduction and DVC."""
