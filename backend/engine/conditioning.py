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

With prompt editing a job has several texts (one per sampling step,
backend.prompting.editing); each distinct text is encoded once, all of a job's
texts the same way (stock only when every one qualifies) and padded to the same
number of windows, so every step's batch has one shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from backend.engine.pipeline import execution_device, is_xl
from backend.guidance_settings import check_clip_skip
from backend.prompting.editing import PromptSchedule
from backend.prompting.weights import Fragment, is_plain, parse_weights

CHUNK = 75  # tokens per window, between BOS and EOS
COMMA_BACKTRACK = 20  # cut a full chunk at a comma this close to its end
Embedding = tuple[torch.Tensor, torch.Tensor | None]  # hidden states [1, n*77, D], SDXL pooled [1, P]


@dataclass(eq=False)  # hashed by identity: the Guider keeps its batched rows per conditioning
class Conditioning:
    """Embeddings for one image: positive, and negative when CFG needs it."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # SDXL pooled text embeds
    uncond_pooled: torch.Tensor | None = None

    def at(self, iteration: int, iterations: int) -> Conditioning:
        """The same at every loop iteration."""
        return self


class StepConditioning:
    """One Conditioning per sampling step (prompt editing); steps with the same texts share one object."""

    def __init__(self, per_step: Sequence[Conditioning]) -> None:
        self.per_step = list(per_step)

    def at(self, iteration: int, iterations: int) -> Conditioning:
        """The conditioning of loop iteration ``iteration`` of ``iterations``.

        Iterations spread evenly over the steps, so both model calls of a second-order
        step (Heun, DPM2, DPM++ SDE: 2 * steps - 1 iterations) use that step's texts.
        """
        return self.per_step[iteration * len(self.per_step) // iterations]


class BatchConditioning:
    """The conditionings of images denoised together: each iteration's :class:`Conditioning` stacks the images'
    own (row k is image k's), so each image keeps its prompt and its prompt editing. The images' embeddings
    must have the same shapes (:func:`batch_shape`)."""

    def __init__(self, members: Sequence[Conditioning | StepConditioning]) -> None:
        self.members = list(members)
        self.stacked: dict[tuple[Conditioning, ...], Conditioning] = {}  # one object per combination: the Guider's key

    def at(self, iteration: int, iterations: int) -> Conditioning:
        parts = tuple(m.at(iteration, iterations) for m in self.members)
        if parts not in self.stacked:
            def cat(name: str) -> torch.Tensor | None:
                tensors = [getattr(p, name) for p in parts]
                return None if tensors[0] is None else torch.cat(tensors)

            self.stacked[parts] = Conditioning(cat("cond"), cat("uncond"), cat("pooled"), cat("uncond_pooled"))
        return self.stacked[parts]


def batch_shape(cond: Conditioning | StepConditioning) -> tuple:
    """What must match for images to share a batch: their embeddings' shapes (long prompts have more windows)."""
    first = cond.at(0, 1)
    return tuple(None if t is None else tuple(t.shape)
                 for t in (first.cond, first.uncond, first.pooled, first.uncond_pooled))


def stack(conds: Sequence[Conditioning | StepConditioning]) -> Conditioning | StepConditioning | BatchConditioning:
    """One image's conditioning as it is; several images' as a :class:`BatchConditioning`."""
    return conds[0] if len(conds) == 1 else BatchConditioning(conds)


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
    """Encode one image's prompts (no prompt editing); weighted/chunked only when the text needs it."""
    return encode_schedule(pipe, PromptSchedule((prompt,), (negative,)), with_uncond, clip_skip).per_step[0]


def encode_schedule(pipe, schedule: PromptSchedule, with_uncond: bool, clip_skip: int = 1) -> StepConditioning:
    """The conditioning of every sampling step of ``schedule``; each distinct text is encoded once."""
    negatives = schedule.negative_prompt if with_uncond else [None] * len(schedule.prompt)
    encoder = TextEncoder(pipe, {"prompt": schedule.prompt, "negative_prompt": negatives if with_uncond else []},
                          clip_skip)
    return StepConditioning([encoder.conditioning(p, n) for p, n in zip(schedule.prompt, negatives)])


class TextEncoder:
    """Encodes the texts of one job, each once, all the same way and to the same number of windows."""

    def __init__(self, pipe, texts: dict[str, Sequence[str]], clip_skip: int) -> None:
        """``texts``: field name (for errors) -> the texts it will ask for."""
        check_clip_skip(clip_skip, min(encoder.config.num_hidden_layers for _, encoder in _encoders(pipe)))
        self.pipe, self.clip_skip = pipe, clip_skip
        fields: dict[str, str] = {}  # text -> the first field that asks for it
        for name, many in texts.items():
            for text in many:
                fields.setdefault(text, name)
        self.chunks: dict[str, list[list[Chunk]]] | None = None  # None: stock encode_prompt
        if clip_skip > 1 or not all(is_plain(t) and _fits(pipe, t) for t in fields):
            self.chunks = {text: _chunked(pipe, text, name) for text, name in fields.items()}
            # Every encoder and every text gets the same number of chunks: pad with empty chunks.
            count = max(len(chunks) for per_encoder in self.chunks.values() for chunks in per_encoder)
            for per_encoder in self.chunks.values():
                for chunks in per_encoder:
                    chunks.extend(([], []) for _ in range(count - len(chunks)))
        self.cache: dict[str, Embedding] = {}
        self.pairs: dict[tuple[str, str | None], Conditioning] = {}

    def embed(self, text: str) -> Embedding:
        if text not in self.cache:
            self.cache[text] = (
                _encode_stock(self.pipe, text) if self.chunks is None
                else _encode_chunks(self.pipe, self.chunks[text], self.clip_skip)
            )
        return self.cache[text]

    def conditioning(self, prompt: str, negative: str | None) -> Conditioning:
        """Positive and (when not None) negative embeddings; one object per distinct pair."""
        if (prompt, negative) not in self.pairs:
            cond, pooled = self.embed(prompt)
            uncond, uncond_pooled = (None, None) if negative is None else self.embed(negative)
            self.pairs[prompt, negative] = Conditioning(cond, uncond, pooled, uncond_pooled)
        return self.pairs[prompt, negative]


def _encode_stock(pipe, text: str) -> Embedding:
    """``encode_prompt`` of one text (its positive branch: the same operations as its negative one)."""
    device = execution_device(pipe)
    if is_xl(pipe):
        cond, _, pooled, _ = pipe.encode_prompt(
            prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
        )
        return cond, pooled
    return pipe.encode_prompt(text, device, 1, False)[0], None


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


def _encode_chunks(pipe, per_encoder: list[list[Chunk]], clip_skip: int) -> Embedding:
    """Encode already-chunked text with each encoder; returns ([1, n*77, D], pooled or None)."""
    xl = is_xl(pipe)
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
    device = execution_device(pipe)
    out = torch.cat(hidden, dim=-1).to(device=device, dtype=dtype)
    return out, (pooled.to(device=device, dtype=dtype) if pooled is not None else None)


def _chunked(pipe, text: str, field: str) -> list[list[Chunk]]:
    """``text`` as weighted chunks, per text encoder."""
    return [
        chunk_tokens(tok, [replace(f, text=_textual_inversion(pipe, tok, f.text)) for f in parse_weights(text, field)])
        for tok, _ in _encoders(pipe)
    ]
