"""Pooled text embeddings from a loaded pipeline's own text encoder (for prompt expansion).

SDXL uses the second encoder's projected embedding, SD1/SD2 the pooled
(end-of-text) hidden state. Each pipeline keeps a bounded cache, so the
expansion vocabulary is encoded once per loaded model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch

BATCH = 64
CACHE_SIZE = 4096

_caches: "weakref.WeakKeyDictionary[object, dict[str, np.ndarray]]" = weakref.WeakKeyDictionary()


def _encoder(pipe):
    encoder = getattr(pipe, "text_encoder_2", None)
    if encoder is not None:
        return pipe.tokenizer_2, encoder
    return pipe.tokenizer, pipe.text_encoder


@torch.inference_mode()
def _embed(pipe, texts: list[str]) -> np.ndarray:
    tokenizer, encoder = _encoder(pipe)
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    out = encoder(ids)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return pooled.float().cpu().numpy()


def make_embedder(pipe) -> Callable[[list[str]], np.ndarray]:
    """``embed_texts(texts) -> ndarray [N, D]`` for :func:`backend.prompting.build_prompt`."""
    cache = _caches.setdefault(pipe, {})

    def embed_texts(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        for start in range(0, len(missing), BATCH):
            batch = missing[start:start + BATCH]
            cache.update(zip(batch, _embed(pipe, batch)))
        result = np.stack([cache[t] for t in texts])
        while len(cache) > CACHE_SIZE:  # oldest first
            del cache[next(iter(cache))]
        return result

    return embed_texts
