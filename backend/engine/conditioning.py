"""Text conditioning: prompt -> embeddings for SD1, SD2 and SDXL pipelines.

Plain prompts that fit one CLIP window (and clip_skip 1) go through the
pipeline's own ``encode_prompt``, so output equals the stock pipeline. Prompts
with A1111 weights, BREAK or more than 75 tokens are encoded the way the
AUTOMATIC1111 web UI documents it: tokens are cut into 75-token chunks (at a
comma within the last 20 tokens when there is one), each chunk is framed with
BOS/EOS and encoded on its own, the chunks are concatenated along the token
axis, and each chunk's hidden states are scaled by their token weights and
then rescaled to keep the chunk's original mean. For SDXL both encoders do
this and the pooled embedding comes from the first chunk. clip_skip applies to
the positive and the negative prompt alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from backend.guidance_settings import check_clip_skip
from backend.prompting.weights import Fragment, is_plain, parse_weights

CHUNK = 75  # tokens per window, between BOS and EOS
COMMA_BACKTRACK = 20  # cut a full chunk at a comma this close to its end


@dataclass
class Conditioning:
    """Embeddings for one image: positive, and negative when CFG needs it."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # SDXL pooled text embeds
    uncond_pooled: torch.Tensor | None = None


def _is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or hasattr(pipe, "tokenizer_2")


def _encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]


def _textual_inversion(pipe, tokenizer, text: str) -> str:
    """Spell out multi-vector embedding tokens (``name`` -> ``name name_1 ...``) as ``encode_prompt`` does."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(text, tokenizer) if convert is not None and text else text


def _fits(pipe, text: str) -> bool:
    return all(
        len(tok(_textual_inversion(pipe, tok, text), verbose=False).input_ids) <= tok.model_max_length
        for tok, _ in _encoders(pipe)
    )


def encode(pipe, prompt: str, negative: str, with_uncond: bool, clip_skip: int = 1) -> Conditioning:
    """Encode one image's prompts; weighted/chunked only when the text needs it."""
    check_clip_skip(clip_skip, min(encoder.config.num_hidden_layers for _, encoder in _encoders(pipe)))
    texts = [prompt, negative] if with_uncond else [prompt]
    if clip_skip <= 1 and all(is_plain(t) and _fits(pipe, t) for t in texts):
        return _encode_stock(pipe, prompt, negative, with_uncond)
    return _encode_weighted(pipe, prompt, negative, with_uncond, clip_skip)


def _encode_stock(pipe, prompt: str, negative: str, with_uncond: bool) -> Conditioning:
    device = pipe._execution_device
    if _is_xl(pipe):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=with_uncond,
            negative_prompt=negative,
        )
        return Conditioning(cond, uncond if with_uncond else None, pooled, uncond_pooled if with_uncond else None)
    cond, uncond = pipe.encode_prompt(prompt, device, 1, with_uncond, negative)
    return Conditioning(cond, uncond if with_uncond else None)


# -- weighted, chunked encoding --------------------------------------------------
Chunk = tuple[list[int], list[float]]  # token ids and weights, without BOS/EOS


def chunk_tokens(tokenizer, fragments: list[Fragment]) -> list[Chunk]:
    """Tokenize weighted fragments into 75-token chunks (A1111 rules: comma backtrack, BREAK)."""
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []

    def flush() -> None:
        chunks.append((ids[:], weights[:]))
        ids.clear()
        weights.clear()

    for frag in fragments:
        if frag.is_break:
            flush()
            continue
        for token in tokenizer(frag.text, add_special_tokens=False, verbose=False).input_ids:
            if len(ids) == CHUNK:
                last_comma = max((i for i, t in enumerate(ids) if t == comma), default=-1)
                if comma is not None and last_comma >= CHUNK - COMMA_BACKTRACK:
                    rest_ids, rest_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                    del ids[last_comma + 1:], weights[last_comma + 1:]
                    flush()
                    ids.extend(rest_ids)
                    weights.extend(rest_weights)
                else:
                    flush()
            ids.append(token)
            weights.append(frag.weight)
    if ids or not chunks:
        flush()
    return chunks


def _frame(tokenizer, chunk: Chunk) -> tuple[list[int], list[float], list[int]]:
    """BOS + tokens + EOS + padding to the window (the layout ``encode_prompt`` feeds the encoder).

    Returns token ids, weights and the attention mask.
    """
    ids, weights = chunk
    pad = CHUNK - len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return (
        [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[pad_id] * pad],
        [1.0, *weights, 1.0, *[1.0] * pad],
        [1] * (len(ids) + 2) + [0] * pad,
    )


def _run_encoder(encoder, ids: torch.Tensor, mask: torch.Tensor, clip_skip: int, xl: bool):
    """Hidden states at the clip_skip layer (as diffusers selects them) and the encoder's first output."""
    use_mask = getattr(encoder.config, "use_attention_mask", False)
    out = encoder(ids, attention_mask=mask if use_mask else None, output_hidden_states=True)
    if xl:  # SDXL uses the penultimate layer, un-normalized
        return out.hidden_states[-(clip_skip + 1)], out[0]
    if clip_skip <= 1:
        return out[0], out[0]
    # transformers 5 flattened CLIPTextModel (no .text_model); diffusers' own clip_skip path misses that.
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return final_norm(out.hidden_states[-clip_skip]), out[0]


def _weighted_hidden(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale by token weights, then restore each chunk's mean (A1111 ``process_tokens``).

    A chunk whose mean is about zero next to its magnitude (a final layer norm
    without bias gives that) keeps the plain scaling: the ratio of two near-zero
    means is noise.
    """
    if bool((weights == 1.0).all()):
        return z
    original = z.mean(dim=(1, 2), keepdim=True)
    scaled = z * weights[..., None]
    current = scaled.mean(dim=(1, 2), keepdim=True)
    floor = 1e-3 * z.abs().mean(dim=(1, 2), keepdim=True)
    usable = (original.abs() > floor) & (current.abs() > floor)
    return scaled * torch.where(usable, original / current.where(usable, torch.ones_like(current)), 1.0)


def _encode_chunks(pipe, per_encoder: list[list[Chunk]], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode already-chunked text with each encoder; returns ([1, n*77, D], pooled or None)."""
    xl = _is_xl(pipe)
    hidden, pooled = [], None
    for (tokenizer, encoder), chunks in zip(_encoders(pipe), per_encoder):
        framed = [_frame(tokenizer, c) for c in chunks]
        ids = torch.tensor([f[0] for f in framed], device=encoder.device)
        weights = torch.tensor([f[1] for f in framed], device=encoder.device)
        mask = torch.tensor([f[2] for f in framed], device=encoder.device)
        z, first = _run_encoder(encoder, ids, mask, clip_skip, xl)
        z = _weighted_hidden(z, weights.to(z.dtype))
        hidden.append(z.reshape(1, -1, z.shape[-1]))
        if first.ndim == 2:  # CLIPTextModelWithProjection: pooled embeds of the first chunk
            pooled = first[:1]
    dtype = (pipe.text_encoder_2 if xl else pipe.text_encoder).dtype
    device = pipe._execution_device
    out = torch.cat(hidden, dim=-1).to(device=device, dtype=dtype)
    return out, (pooled.to(device=device, dtype=dtype) if pooled is not None else None)


def _encode_weighted(pipe, prompt: str, negative: str, with_uncond: bool, clip_skip: int) -> Conditioning:
    texts = {"prompt": prompt, "negative_prompt": negative} if with_uncond else {"prompt": prompt}
    chunked = {
        field: [
            chunk_tokens(tok, [replace(f, text=_textual_inversion(pipe, tok, f.text)) for f in parse_weights(text, field)])
            for tok, _ in _encoders(pipe)
        ]
        for field, text in texts.items()
    }
    # Every encoder and both prompts get the same number of chunks: pad with empty chunks.
    count = max(len(chunks) for per_encoder in chunked.values() for chunks in per_encoder)
    for per_encoder in chunked.values():
        for chunks in per_encoder:
            chunks.extend(([], []) for _ in range(count - len(chunks)))
    cond, pooled = _encode_chunks(pipe, chunked["prompt"], clip_skip)
    if not with_uncond:
        return Conditioning(cond, None, pooled, None)
    uncond, uncond_pooled = _encode_chunks(pipe, chunked["negative_prompt"], clip_skip)
    return Conditioning(cond, uncond, pooled, uncond_pooled)
