"""The real CLIP tokenizer, built offline from the BPE vocabulary shipped in ``backend/model_configs``.

SD1's CLIP-L, SD2's OpenCLIP-H and SDXL's two encoders all use OpenAI's CLIP
BPE (``bpe_simple_vocab_16e6.txt.gz``, MIT, the same file open_clip and
clip-anytorch ship). Its vocabulary is built as CLIP's ``SimpleTokenizer``
builds it: the 256 byte characters, the same with ``</w>``, one token per
merge (the first 48,894 merge lines), then the two special tokens: 49,408
tokens, ids equal to the Hugging Face ``openai/clip-vit-large-patch14`` tokenizer.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from backend.engine.demo_models import BOS, EOS, _byte_chars

BPE_FILE = Path(__file__).resolve().parent.parent / "model_configs" / "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49408 - 256 * 2 - 2  # merge lines used by CLIP


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    chars = _byte_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS):
    """A CLIPTokenizer with CLIP's vocabulary. SD2 and SDXL's second tokenizer pad with ``"!"``."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token=pad_token)
