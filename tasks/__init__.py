"""Prefect tasks: one thin wrapper per engine call; paths and small JSON-able configs in and out, never tensors."""

# transformers resolves its top-level names lazily, and that resolution is not thread-safe: two tasks importing
# `from transformers import AutoTokenizer` at once in Prefect's thread pool can fail with ImportError. Resolving
# the names the engine uses once, here, in the importing thread, takes the race away.
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402,F401

import logging  # noqa: E402

# The engine logs progress (one line per quantized block) under "turboquant"; PREFECT_LOGGING_EXTRA_LOGGERS=turboquant
# gives that logger Prefect's handlers, and this level lets the lines reach the task run's logs.
if logging.getLogger("turboquant").level == logging.NOTSET:
    logging.getLogger("turboquant").setLevel(logging.INFO)
