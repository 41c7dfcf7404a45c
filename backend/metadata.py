"""Image metadata: our JSON text chunk plus A1111-style ``parameters`` text (see backend.infotext)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from backend import infotext, jobkinds, user_files
from backend.errors import DreamttyError, RequestError
from backend.guidance_settings import GuidanceSettings, freeu_defaults
from backend.image_prompts import TYPES
from backend.input_images import MAX_BYTES, UNREADABLE, open_quietly, unreadable
from backend.request import GenerateRequest
from backend.style_names import RANDOM_STYLE, style_key
from backend.values import is_whole, shown

CHUNK = "dreamtty"
VERSION = 1
RECORDED = ("prompt", "model", "seed")  # in every request our metadata holds: without them it is not one we wrote


def build(request: GenerateRequest, family: str, prompt_record: dict, kind: str = "generate") -> dict:
    """The metadata dict saved with an image (request is the per-image request of a job of ``kind``)."""
    return {"version": VERSION, "kind": kind, "family": family, "request": request.to_dict(), "prompt": prompt_record}


def parameters_text(path: str | Path) -> str:
    """The A1111 ``parameters`` text of the image at ``path``, from our metadata; a one-line DreamttyError
    when it has none or it lacks a field (written by hand, or by another tool under our chunk's name)."""
    try:
        return a1111_parameters(read(path))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DreamttyError(f"cannot show its parameters: {type(exc).__name__}: {exc}") from None


def a1111_parameters(meta: dict) -> str:
    """A1111 ``parameters`` text, readable by A1111's PNG Info, Civitai and most image viewers."""
    req = meta["request"]
    prompt = meta.get("prompt", {})
    loras = prompt.get("loras") or [{"name": n, "weight": w} for n, w in req.get("loras", [])]
    tags = [f"<lora:{x['name']}:{x['weight']:g}>" for x in loras]  # A1111 keeps LoRAs in the prompt text
    positive = " ".join(t for t in [prompt.get("positive", req["prompt"]), *tags] if t)
    fields: list[tuple[str, object]] = [
        ("Steps", req["steps"]),
        ("Sampler", infotext.sampler_label(req["sampler"])),
        ("Schedule type", infotext.SCHEDULE_LABELS[req["scheduler"]]),
        ("CFG scale", req["cfg"]),
        ("Seed", req["seed"]),
        ("Size", f"{req['width']}x{req['height']}"),
        ("Model", req["model"]),
    ]
    if req.get("vae"):
        fields += [("VAE hash", (prompt.get("vae") or {}).get("hash")), ("VAE", req["vae"])]
    if req.get("refiner"):
        fields += [("Refiner", req["refiner"]), ("Refiner switch at", req["refiner_switch"])]
    guidance = GuidanceSettings.from_dict(req.get("guidance") or {}).non_neutral()
    if guidance.get("freeu") == ():
        guidance["freeu"] = freeu_defaults(meta.get("family", ""))
    fields += [(infotext.GUIDANCE_KEYS[k], _guidance_value(k, v)) for k, v in guidance.items()]
    if loras:
        fields.append(("Lora hashes", ", ".join(f"{x['name']}: {x.get('a1111_hash') or x.get('hash')}" for x in loras)))
    if req.get("styles"):  # the styles applied, by their names: a Random Style's pick, not "Random Style"
        fields.append(("Styles", "; ".join(prompt.get("styles") or req["styles"])))
    fields += _control_units(req.get("image_prompts") or [], prompt.get("image_prompts") or [])
    fields += jobkinds.get(meta.get("kind", "generate")).request(req).a1111_fields()
    fields.append(("Version", "dreamtty"))
    return infotext.format_text(positive, prompt.get("negative", req["negative_prompt"]), fields)


def _control_units(references: list[dict], records: list[dict]) -> list[tuple[str, str]]:
    """A1111's ControlNet extension fields, one unit per reference that applied (IP-Adapters are units there too):
    ``ControlNet 0: "Module: canny, Model: name [hash], Weight: 1, Guidance Start: 0, Guidance End: 0.5"``."""
    units = []
    for record in records:
        ref = references[record["index"]]
        module = record.get("preprocessor") or "ip-adapter_clip"
        units.append((f"ControlNet {record['index']}",
                      f"Module: {module}, Model: {record['model']} [{record['hash']}], Weight: {ref['weight']:g}, "
                      f"Guidance Start: 0, Guidance End: {ref['stop']:g}"))
    return units


def _guidance_value(name: str, value: object) -> object:
    """Tuples as Fooocus writes them, e.g. ``(1.5, 0.8, 0.3)``; FreeU in Fooocus's order (b1, b2, s1, s2)."""
    if name == "freeu":
        s1, s2, b1, b2 = value  # type: ignore[misc]  # ours is (s1, s2, b1, b2)
        value = (b1, b2, s1, s2)
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")"
    return value


def png_info(meta: dict) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    info.add_text(CHUNK, json.dumps(meta, sort_keys=True))
    return info


def _text_chunks(path: str | Path) -> dict[str, str]:
    try:
        fh = user_files.open_regular(path, MAX_BYTES)
    except OSError as exc:
        raise user_files.read_error("image", path, exc, "an image file") from None
    try:
        with fh, open_quietly(fh) as img:
            return dict(getattr(img, "text", {}))
    except UNREADABLE as exc:
        raise unreadable("image", path, exc) from None


class ImageMetadata:
    """The metadata text chunks of one image file, read once: our own (:meth:`meta`, :meth:`record`) and the
    request that reproduces the image (:meth:`request`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.chunks = _text_chunks(path)

    @property
    def ours(self) -> bool:
        """Whether the image has a dreamtty metadata chunk, usable or not."""
        return bool(self.chunks.get(CHUNK))

    def meta(self) -> object:
        """Our metadata as written (a mapping, unless it was hand-edited); a one-line DreamttyError when there is
        none or it is not JSON."""
        if not self.ours:
            raise DreamttyError(f"image: {self.path} has no dreamtty metadata")
        try:
            return json.loads(self.chunks[CHUNK])
        except (ValueError, RecursionError):
            raise DreamttyError(f"image: {self.path} has corrupt dreamtty metadata") from None

    def record(self) -> dict:
        """The prompt record of our metadata ({} for another tool's image, or metadata without one)."""
        try:
            meta = self.meta()
        except DreamttyError:
            return {}
        record = meta.get("prompt") if isinstance(meta, dict) else None
        return record if isinstance(record, dict) else {}

    def request(self) -> tuple[GenerateRequest, list[str]]:
        """The request that reproduces the image, and warnings for the user.

        Our own metadata gives the exact request (no warnings). An image from A1111, Fooocus or a tool that
        writes their formats gives the closest request we can make, with warnings saying what differs.
        """
        if self.ours:
            return request_from_meta(f"image: {self.path}", self.meta()), []
        if self.chunks.get("parameters"):
            from backend import foreign_metadata

            return foreign_metadata.from_png_text(self.chunks, f"image: {self.path}")
        if "workflow" in self.chunks or "prompt" in self.chunks:
            raise DreamttyError(f"image: {self.path} holds a ComfyUI workflow; dreamtty reads A1111 and Fooocus "
                                "metadata")
        raise DreamttyError(f"image: {self.path} has no dreamtty, A1111 or Fooocus metadata")


def read(path: str | Path) -> dict:
    """Read our metadata from a PNG; a one-line DreamttyError when it has none."""
    return ImageMetadata(path).meta()


def image_request(path: str | Path) -> tuple[GenerateRequest, list[str]]:
    """:meth:`ImageMetadata.request` of the image at ``path``."""
    return ImageMetadata(path).request()


def text_request(text: str, source: str) -> tuple[GenerateRequest, list[str], bool]:
    """The request of a pasted parameters text (``source`` as :func:`request_from_meta`'s), its warnings, and
    whether the text is our own metadata: the JSON an image's dreamtty chunk holds gives its exact request (its
    Random Style picks as made); another tool's text or JSON the closest (``backend.foreign_metadata.from_text``)."""
    from backend import foreign_metadata

    try:
        data = json.loads(text) if text.lstrip().startswith("{") else None
    except (ValueError, RecursionError):
        data = None  # said by from_text
    if isinstance(data, dict) and "request" in data:
        return as_made(request_from_meta(source, data), data.get("prompt")), [], True
    return *foreign_metadata.from_text(text, source), False


def as_made(request: GenerateRequest, record: object) -> GenerateRequest:
    """For reproducing: ``request`` as the image made it, by its prompt ``record``: each "Random Style" replaced by
    the style it picked (styles added or removed since do not change the pick), each reference named the model it
    used (another of its type added since is not taken instead)."""
    if not isinstance(record, dict):
        return request
    return _with_reference_models(_with_style_picks(request, record.get("styles")), record.get("image_prompts"))


def _with_style_picks(request: GenerateRequest, picks: object) -> GenerateRequest:
    """``picks``: the styles applied, in order."""
    randoms = [style_key(name) == style_key(RANDOM_STYLE) for name in request.styles]
    if not any(randoms) or not isinstance(picks, list) or len(picks) != len(request.styles):
        return request
    if not all(isinstance(pick, str) and pick for pick in picks):
        return request
    return replace(request, styles=[pick if random else name for name, pick, random in
                                     zip(request.styles, picks, randoms)])


def _with_reference_models(request: GenerateRequest, records: object) -> GenerateRequest:
    """``records``: what each reference that applied used, by its index."""
    used = {r["index"]: r["model"] for r in _dicts(records)
            if is_whole(r.get("index")) and isinstance(r.get("model"), str) and r["model"]}
    if not used:
        return request
    return replace(request, image_prompts=[replace(prompt, model=used.get(i, prompt.model))
                                           for i, prompt in enumerate(request.image_prompts)])


def prompt_change(recorded: object, made: object) -> str | None:
    """Why a reproduced image (prompt record ``made``) is not the image (``recorded``): the first wildcard that
    picked another line, else the final texts themselves, else the first model file (LoRA, embedding, VAE, refiner,
    upscaler, image prompt model) that changed or stood in for another; None when they are the same, or when
    nothing was recorded (another tool's image)."""
    if not isinstance(recorded, dict) or not recorded or not isinstance(made, dict):
        return None
    return _wildcard_or_text_change(recorded, made) or _file_change(recorded, made)


_HASHED = {"vae": "VAE", "refiner": "refiner", "upscaler": "upscaler"}  # record key -> what it is to a user
_REFERENCE_MODEL = {"ip_adapter": "IP-Adapter", "controlnet": "ControlNet"}


def _file_change(recorded: dict, made: dict) -> str | None:
    then = _model_files(recorded)
    for what, now in _model_files(made).items():
        old = then.get(what)
        if old is None or old.get("hash") == now.get("hash"):
            continue
        if old.get("name") == now.get("name"):
            return f"{what}: its file changed since (hash {now.get('hash')}, the image's {old.get('hash')})"
        return (f"{what}: {now.get('name')} (hash {now.get('hash')}) stood in for the image's {old.get('name')} "
                f"(hash {old.get('hash')})")
    return None


def _model_files(record: dict) -> dict[str, dict]:
    """The model files a prompt record names with their short hashes, by what each is to a user ("LoRA fox", "VAE",
    "image prompt 1's ControlNet"): ``{"name": ..., "hash": ...}`` each."""
    files = {f"{what} {item.get('name')}": item for key, what in (("loras", "LoRA"), ("embeddings", "embedding"))
             for item in _dicts(record.get(key))}
    files |= {what: record[key] for key, what in _HASHED.items() if isinstance(record.get(key), dict)}
    for ref in _dicts(record.get("image_prompts")):
        kind = TYPES.get(ref.get("type")) if isinstance(ref.get("type"), str) else None
        if not is_whole(ref.get("index")) or kind is None:
            continue
        which = f"image prompt {ref['index'] + 1}'s"
        files[f"{which} {_REFERENCE_MODEL[kind.model]}"] = {"name": ref.get("model"), "hash": ref.get("hash")}
        files |= {f"{which} {what}": ref[key] for key, what in (("encoder", "image encoder"),
                                                                 ("depth_model", "depth model"))
                  if isinstance(ref.get(key), dict)}
    return files


def _dicts(value: object) -> list[dict]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _wildcard_or_text_change(recorded: dict, made: dict) -> str | None:
    before, after = recorded.get("wildcards"), made.get("wildcards")
    if isinstance(before, list) and isinstance(after, list):
        for old, new in zip(before, after):
            if isinstance(old, dict) and isinstance(new, dict) and old.get("pick") != new.get("pick"):
                return (f"wildcard __{new.get('name')}__ picked {new.get('pick')!r}, the image's {old.get('pick')!r} "
                        "(its file changed since)")
    for key, name in (("positive", "prompt"), ("negative", "negative prompt")):
        if recorded.get(key) != made.get(key):
            return f"the final {name} differs from the image's (a style or wildcard file changed since)"
    return None


def request_from_image(path: str | Path) -> GenerateRequest:
    """The request of :func:`image_request`, without its warnings."""
    return image_request(path)[0]


def request_from_meta(source: str, meta: object) -> GenerateRequest:
    """The request our metadata ``meta`` records (``source``: where it was read, as ``image: PATH`` or
    ``from-text: FILE``, the field and the place errors name). One that lacks what every version records, or of
    a version this one does not know, is refused: its defaults and a new seed would make another image."""
    request = recorded_fields(source, meta)
    try:
        return jobkinds.get(meta.get("kind", "generate")).request(request)
    except RequestError as exc:
        raise RequestError(exc.field, f"in the metadata of {source.partition(': ')[2]}: {exc.message}") from None


def recorded_fields(source: str, meta: object) -> dict:
    """The request fields our metadata ``meta`` records, as written (``source`` as :func:`request_from_meta`'s);
    RequestError for metadata without them, or of a version this dreamtty does not know."""
    field, _, where = source.partition(": ")
    request = meta.get("request") if isinstance(meta, dict) else None
    if not isinstance(request, dict):
        raise RequestError(field, f"{where} has dreamtty metadata without a request")
    version = meta.get("version")
    if version is not None and not (is_whole(version) and 1 <= version <= VERSION):
        raise RequestError(field, f"{where} has dreamtty metadata of version {shown(version)}; this dreamtty reads "
                                  f"version {VERSION} (a newer one wrote it?)")
    missing = [key for key in RECORDED if key not in request]
    if missing:
        raise RequestError(field, f"{where} has dreamtty metadata without {', '.join(missing)}: edited or damaged; "
                                  "it cannot be reproduced")
    return request
