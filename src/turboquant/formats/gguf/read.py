"""Reading a GGUF file back (tests, validation): its tensor types, and the float weights under Hugging Face names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from turboquant.formats.gguf import model as gguf_model
def read_state_dict(path: str | Path, config: dict[str, Any], hf_names: list[str]) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of a GGUF file (``gguf.quants.dequantize``) back to Hugging Face names and layout.

    ``hf_names`` are the model's state-dict names (e.g. ``build_skeleton(...).state_dict()``); q/k rows are
    permuted back for llama-architecture files.
    """
    import gguf

    names = gguf_model.NameMap(config)
    back: dict[str, str] = {}
    for n in hf_names:
        g = names.gguf_name(n) if not n.endswith("rotary_emb.inv_freq") else None
        if g is not None:
            back[g] = n
    reader = gguf.GGUFReader(str(path))
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name not in back:
            continue
        hf = back[t.name]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w = w.reshape(shape) - names.value_shift(hf)
        perm = names.permutation(hf)
        if perm is not None:
            order = torch.from_numpy(gguf_model.qk_row_order(*perm))
            restored = torch.empty_like(w)
            restored[order] = w
            w = restored
        state[hf] = w
    return state


def tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name → type name (e.g. ``blk.0.attn_q.weight: Q4_0``)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
