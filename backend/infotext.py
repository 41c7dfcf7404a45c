"""A1111's ``parameters`` text ("infotext"): names, quoting and layout, for writing and reading it.

The text is read by A1111's PNG Info, Civitai and tools like sd-parsers. Its layout, as A1111
documents and writes it: the prompt (any number of lines); then, when there is one, the negative
prompt on a line starting ``Negative prompt:`` (it may continue over more lines); then one line of
``Key: value`` pairs joined by ``", "``. That last line counts as parameters only when it holds at
least three pairs. A value holding a comma, a colon or a newline is written as a JSON string, so it
cannot split the line. Written here from that description (A1111 is AGPL; none of its code is used).

Sampler and schedule facts are from A1111 v1.10's sampler table: since v1.9 the schedule is its own
``Schedule type`` field, and "Automatic" means the sampler's own default schedule, listed in
:data:`AUTOMATIC`. Before v1.9 the schedule was part of the sampler's name (``DPM++ 2M Karras``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from backend.samplers import SAMPLERS

NEGATIVE = "Negative prompt:"

# Our sampler -> A1111's name. DEIS, TCD and DDPM have none; their own label is written instead
# (A1111 falls back to its default sampler for a name it does not know; the line still parses).
A1111_SAMPLERS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
    "lcm": "LCM",
    "pndm": "PLMS",
}
# Our schedule -> A1111's "Schedule type" label. Our "normal" (timesteps evenly spaced) is A1111's "Uniform".
SCHEDULE_LABELS: dict[str, str] = {
    "normal": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
}
# A1111 v1.9+: the schedule "Automatic" picks for a sampler (all others: Uniform).
AUTOMATIC: dict[str, str] = {
    "DPM++ 2M": "karras",
    "DPM++ SDE": "karras",
    "DPM++ 2M SDE": "exponential",
    "DPM++ 2M SDE Heun": "exponential",
    "DPM++ 3M SDE": "exponential",
    "DPM++ 2S a": "karras",
    "DPM2": "karras",
    "DPM2 a": "karras",
    "Restart": "karras",
}
# Every schedule label A1111 v1.10 knows (its ``Schedule type`` choices), for splitting old
# "Sampler Schedule" names such as "DPM++ 2M Karras".
A1111_SCHEDULES = (
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
    "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)

# Guidance controls on the parameters line: the names A1111 (Clip skip) and Fooocus use where they have them.
GUIDANCE_KEYS: dict[str, str] = {
    "clip_skip": "Clip skip",
    "sharpness": "Sharpness",
    "adaptive_cfg": "Adaptive CFG",
    "adm_scale": "ADM Guidance",
    "freeu": "FreeU",  # Fooocus's order: (b1, b2, s1, s2)
    "cfg_rescale": "CFG rescale",
    "perp_neg": "PerpNeg",
    "sag": "SAG",
    "pag": "PAG",
    "apg": "APG",
}

_KEY = re.compile(r"\s*(\w[\w \-/]*?)\s*:\s*")
_MIN_PAIRS = 3  # fewer pairs on the last line: it is prompt text, not parameters


def sampler_label(sampler: str) -> str:
    """The name A1111 knows ``sampler`` by, or our label when A1111 has no such sampler."""
    return A1111_SAMPLERS.get(sampler) or SAMPLERS[sampler].label


def quote(value: object) -> str:
    """``value`` as text that keeps its place on the parameters line (A1111's rule: JSON-quote text holding
    a comma, colon or newline; also text that starts with a quote, has outer spaces or control characters)."""
    text = str(value)
    risky = any(c in text for c in ",:\n") or text.startswith('"') or text != text.strip()
    if risky or any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_text(prompt: str, negative: str, fields: list[tuple[str, object]]) -> str:
    """The whole text: prompt lines as they are, the negative prompt line when there is one, the parameters."""
    body = ", ".join(f"{key}: {quote(value)}" for key, value in fields if value is not None)
    return "\n".join([*([prompt] if prompt else []), *([f"{NEGATIVE} {negative}"] if negative else []), body])


@dataclass
class Infotext:
    prompt: str
    negative: str
    fields: dict[str, str] = field(default_factory=dict)


def parse(text: str) -> Infotext | None:
    """Split a parameters text into prompt, negative prompt and fields; None when it has no parameters line."""
    lines = text.replace("\r\n", "\n").strip().split("\n")
    fields = parse_fields(lines[-1])
    if len(fields) < _MIN_PAIRS:
        return None
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines[:-1]:
        if negative is None and line.lstrip().startswith(NEGATIVE):
            negative = [line.lstrip()[len(NEGATIVE):].removeprefix(" ")]
        elif negative is None:
            prompt.append(line)
        else:
            negative.append(line)
    return Infotext("\n".join(prompt), "\n".join(negative or []), fields)


def parse_fields(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value"`` -> {key: value} (a later repeat of a key wins)."""
    fields: dict[str, str] = {}
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(line):
        key = _KEY.match(line, pos)
        if key is None:  # an item without "Key:": skip it
            end = line.find(",", pos)
            if end < 0:
                break
            pos = end + 1
            continue
        pos = key.end()
        if line.startswith('"', pos):
            try:
                value, pos = decoder.raw_decode(line, pos)
            except ValueError:
                break
            value = str(value)
            end = line.find(",", pos)
            pos = len(line) if end < 0 else end
        else:
            end = line.find(",", pos)
            end = len(line) if end < 0 else end
            value, pos = line[pos:end].strip(), end
        fields[key.group(1)] = value
        pos += 1  # the comma
    return fields
