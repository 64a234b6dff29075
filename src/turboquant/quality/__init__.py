"""Measuring artifacts: evaluation, the runtimes that load each format, validation, gates, lm-eval tasks, reports."""
