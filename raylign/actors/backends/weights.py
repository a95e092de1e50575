"""Reading a weight file written by the trainer: one safetensors file, streamed tensor by tensor."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from safetensors import safe_open


def iter_safetensors(path: str, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            if name not in skip:
                yield name, f.get_tensor(name)
