"""The Generate screen's request form: every field of a request, read and filled both ways."""

from __future__ import annotations

import asyncio
import re
from dataclasses import fields

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.geometry import Region
from textual.widget import Widget
from textual.widgets import Checkbox, Collapsible, Input, Select, Static, TextArea

from backend import library, request_builder
from backend.errors import DreamttyError, RequestError, field_and_message, noted
from backend.families import FAMILIES, MODEL_NAMES, aspect_sizes
from backend.guidance_settings import (ADM_SCALE_RANGE, CLIP_SKIP_MAX, FREEU_RANGE, RANGES, GuidanceSettings,
                                      format_guidance_value)
from backend.models import DEMO_MODELS, resolve_model, trained_model
from backend.prompting.presets import PresetInfo, list_presets
from backend.prompting.styles import RANDOM_STYLE, load_styles
from backend.request import DTYPES, SPEEDS, GenerateRequest, parse_size
from backend.safetext import cut_line
from backend.samplers import SAMPLERS
from backend.training.runs import list_runs
from tui.suggest import ChoiceSuggester
from tui.text import TextEditor, notify, plain
from tui.widgets.field import Field, field_input, field_select
from tui.widgets.input_image import NONE, InputImageSection
from tui.widgets.reference_images import ReferenceImages
from tui.widgets.style_picker import StyleInfo, StylePicker

CUSTOM_SIZE = "custom"
INPUT_SIZE = "input"  # an image-input job's size comes from its input image
PRESET_LABEL = 72  # characters of a preset's name and description in its list
_TEXT_FIELDS = ("model", "steps", "cfg", "count", "loras", "vae", "refiner", "refiner_switch")  # plain Inputs
_SELECT_FIELDS = ("sampler", "scheduler", "dtype", "speed")
# Performance: (label, steps). Extreme speed also switches to the LCM sampler and CFG 1 (distilled models).
PERFORMANCE = {"speed": ("Speed", 30), "quality": ("Quality", 60), "extreme": ("Extreme speed", 8)}
GALLERY_CHOICES = 200  # recent jobs whose images the Image field completes
FEW_STEP_WORDS = ("LCM", "turbo", "lightning", "hyper")  # in the name of a few-step model or LoRA
FEW_STEP_NAME = re.compile("|".join(FEW_STEP_WORDS), re.IGNORECASE)
_SCALES = {"perp_neg": "PerpNeg scale", "sag": "Self-Attention Guidance scale", "sharpness": "detail sharpening",
           "cfg_rescale": "CFG rescale", "adaptive_cfg": "mimic CFG at high CFG", "pag": "Perturbed Attention Guidance",
           "apg": "Adaptive Projected Guidance norm threshold"}
GUIDANCE_HINTS = {
    **{name: f"{what} {RANGES[name][0]:g}..{RANGES[name][1]:g}, 0 = off" for name, what in _SCALES.items()},
    "adm_scale": f"SDXL: POS,NEG {ADM_SCALE_RANGE[0]:g}..{ADM_SCALE_RANGE[1]:g}, END 0..1; empty = off",
    "freeu": f"S1,S2,B1,B2 each {FREEU_RANGE[0]:g}..{FREEU_RANGE[1]:g}, 'default' = family values; empty = off",
    "clip_skip": f"1..{CLIP_SKIP_MAX}, 1 = last text-encoder layer",
}


def style_choices() -> tuple[list[StyleInfo], list[str]]:
    """Every style (with the seeded "Random Style" first) and the problems met loading them."""
    library = load_styles()
    styles = [StyleInfo(RANDOM_STYLE, "a style picked at random, seeded by the image seed")]
    styles += [StyleInfo(s.name, s.prompt, s.negative_prompt) for s in library.search("")]
    return styles, library.warnings


def performance_of(data: dict) -> str | object:
    """The Performance choice that gives ``data``'s steps (Extreme speed: with the LCM sampler too)."""
    key = next((k for k, (_, n) in PERFORMANCE.items() if n == data.get("steps")), None)
    if key is None or (key == "extreme" and data.get("sampler", "lcm") != "lcm"):
        return Select.NULL
    return key


def few_step_allowed(model: str, loras: str) -> bool:
    """Extreme speed needs a few-step model or LoRA (LCM, turbo, lightning, hyper), judged by name."""
    return bool(FEW_STEP_NAME.search(f"{model} {loras}"))


def _size_value(width: int, height: int) -> str:
    return f"{width}x{height}"


def _size_options(family: str) -> list[tuple[str, str]]:
    sizes = aspect_sizes(family if family in FAMILIES else "sdxl")
    return [(f"{w}×{h}", _size_value(w, h)) for w, h in sizes] + [("custom W×H", CUSTOM_SIZE),
                                                                     ("the input image's", INPUT_SIZE)]


def _field_values(field: Field) -> tuple:
    """What the controls of ``field`` hold now."""
    return tuple(w.text if isinstance(w, TextArea) else w.value for w in field.query("Input, TextArea, Select"))


def _preset_options(presets: list[PresetInfo]) -> list[tuple[str, str]]:
    """Each preset's name and description on one line: a long description grew the closed field to 15 rows."""
    return [(plain(cut_line(f"{p.name}: {p.description}" if p.description else p.name, PRESET_LABEL)), p.name)
            for p in presets]


class GenerateForm(VerticalScroll, can_focus=False):
    """Every field of a :class:`GenerateRequest`; ``read_request`` / ``fill`` convert both ways.

    Not focusable itself: tab goes field to field and the form scrolls to the focused one.
    """

    def __init__(self, model: str, keep_model: bool = False, preset: str | None = None,
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self.keep_model = keep_model  # a model named on the command line wins over presets
        self.default_preset = preset  # loaded into the form after the first frame
        self.ready = asyncio.Event()  # set once every field is mounted and the default preset is in the form
        self.presets: list[PresetInfo] = []  # listed after the first frame
        self._preset_wanted: str | None = None  # the preset being read in a thread
        self.family = "demo"
        self._performance: str | None = None
        self._error_values: dict[Field, tuple] = {}  # fields showing an error: their values then
        self._carried: dict = {}  # request fields the form has no field for, kept from the last fill

    def compose(self) -> ComposeResult:
        yield Static("", id="form-error")
        yield Field("Prompt", TextEditor(id="prompt", placeholder="what to draw"), names=("prompt",))
        yield Field("Negative prompt", TextEditor(id="negative_prompt", placeholder="what to avoid"),
                    names=("negative_prompt",))
        yield Field("Styles", StylePicker(id="styles"), names=("styles",))
        with Horizontal(classes="row"):
            yield Field("Preset", field_select("preset", [], prompt="none"), names=("preset",))
            yield Field("Model", field_input("model", self.model, suggester=ChoiceSuggester(DEMO_MODELS)),
                        names=("model",))
        with Horizontal(classes="row"):
            performance = [(label, key) for key, (label, _) in PERFORMANCE.items()]
            yield Field("Performance", field_select("performance", performance, prompt="custom"),
                        names=("performance",))
            sampler = GenerateRequest.sampler
            yield Field("Sampler", field_select("sampler", [(s.label, s.name) for s in SAMPLERS.values()], sampler),
                        names=("sampler",))
            yield Field("Schedule", field_select("scheduler", [(s, s) for s in SAMPLERS[sampler].schedules],
                                            SAMPLERS[sampler].default_schedule), names=("scheduler",))
        with Horizontal(classes="row"):
            yield Field("Steps", field_input("steps", placeholder="model default"), names=("steps",))
            yield Field("CFG", field_input("cfg", f"{GenerateRequest.cfg:g}"), names=("cfg",))
            yield Field("Images", field_input("count", str(GenerateRequest.count)), names=("count",))
        with Horizontal(classes="row"):
            yield Field("Seed", field_input("seed", placeholder="random", disabled=True),
                        Checkbox("random", True, compact=True, id="seed-random"), names=("seed",))
            yield Field("Size", field_select("size", _size_options("demo"), _size_value(128, 128)),
                        field_input("size-custom", placeholder="W×H", disabled=True),
                        names=("size", "width", "height"))
        with Horizontal(classes="row"):
            yield Field("LoRAs", field_input("loras", placeholder="NAME[:WEIGHT], …"), names=("lora", "loras"))
            yield Field("Prompt expansion", Checkbox("expand", GenerateRequest.expand, compact=True, id="expand"),
                        names=("expand",))

    @staticmethod
    def _guidance() -> Collapsible:
        """The Guidance group; collapsed and below the first screen, it is mounted after the first frame."""
        names = [f for f in fields(GuidanceSettings)]
        rows = [Horizontal(*(Field(f.name.replace("_", " "),
                                   field_input(f"g-{f.name}", format_guidance_value(f.default), "off"),
                                   names=(f.name,), hint=GUIDANCE_HINTS.get(f.name, "")) for f in pair), classes="row")
                for pair in (names[i:i + 2] for i in range(0, len(names), 2))]
        return Collapsible(*rows, title="Guidance", id="guidance")

    @staticmethod
    def _advanced() -> Collapsible:
        """VAE, refiner and precision: collapsed, mounted after the first frame like Guidance."""
        return Collapsible(
            Horizontal(Field("VAE", field_input("vae", placeholder="the model's own"), names=("vae",)),
                       Field("Dtype", field_select("dtype", [(d, d) for d in DTYPES], GenerateRequest.dtype),
                             names=("dtype",)),
                       Field("Speed", field_select("speed", [(s, s) for s in SPEEDS], GenerateRequest.speed),
                             names=("speed",), hint="fast: compiled UNet (CUDA); fastest: + float8"),
                       classes="row"),
            Horizontal(Field("Refiner", field_input("refiner", placeholder="none (SDXL)"), names=("refiner",)),
                       Field("Refiner switch", field_input("refiner_switch", f"{GenerateRequest.refiner_switch:g}"),
                             names=("refiner_switch",), hint="fraction of the schedule for the base"),
                       classes="row"),
            title="Model extras", id="advanced")

    def on_mount(self) -> None:
        self._no_blinking(self)
        self.app.after_first_frame(self._after_first_frame)

    @staticmethod
    def _no_blinking(parent: Widget) -> None:
        for widget in parent.query("Input, TextArea"):
            widget.cursor_blink = False  # a blinking cursor repaints twice a second, over SSH too

    def _input_image(self) -> Collapsible:
        """The Input image section, collapsed and mounted after the first frame like Guidance."""
        section = InputImageSection(self.app.key_for("mask.edit"), id="input-section")
        return Collapsible(section, title="Input image", id="input-image")

    @staticmethod
    def _image_prompts() -> Collapsible:
        """Reference images that steer the image (image prompts), collapsed and mounted after the first frame."""
        return Collapsible(ReferenceImages(id="references"), title="Image prompts", id="image-prompts")

    @property
    def references(self) -> ReferenceImages:
        return self.query_one(ReferenceImages)

    @property
    def input_section(self) -> InputImageSection:
        return self.query_one(InputImageSection)

    @work(group="form-setup")
    async def _after_first_frame(self) -> None:
        """Mount the collapsed groups, then start what the first frame did without, each in a thread: the
        model's family, the Model field's completions, the styles and the presets, then the default preset,
        and the gallery's images for the Image field."""
        groups = [self._input_image(), self._image_prompts(), self._advanced(), self._guidance()]
        await self.mount_all(groups)
        for group in groups:
            self._no_blinking(group)
        if not self.default_preset:
            self.ready.set()  # else once the default preset is in the form: a job queued at once uses it
        self.update_family(self.model)
        self._load_model_choices()
        self._load_styles()
        self.load_presets(self.default_preset, apply=True)
        self._load_gallery()

    @work(exclusive=True, group="gallery-choices", exit_on_error=False)
    async def _load_gallery(self) -> None:
        jobs = await self.app.client.jobs(limit=GALLERY_CHOICES, with_images=True)
        paths = [path for job in jobs for path in reversed(job.outputs)]
        self.input_section.set_gallery(paths)
        self.references.set_gallery(paths)

    @work(thread=True, exclusive=True, group="styles", exit_on_error=False)
    def _load_styles(self) -> None:
        styles, warnings = style_choices()
        self.app.call_from_thread(self._styles_loaded, styles, warnings)

    def _styles_loaded(self, styles: list[StyleInfo], warnings: list[str]) -> None:
        self.query_one(StylePicker).set_styles(styles)
        for warning in warnings[:3]:
            notify(self, warning, title="styles", severity="warning")

    # -- reading the form --------------------------------------------------
    def _input(self, selector: str) -> str:
        return self.query_one(selector, Input).value.strip()

    def read_request(self, input_image: bool = True) -> GenerateRequest:
        """The form as a request of the Input image section's kind (through the one request builder; the form
        already holds its preset's values, so they are all explicit); raises RequestError naming the field.
        Ranges and the input files are checked by the service. Without ``input_image``: text to image, with
        no size when the size is the input image's (a preset saved from the form)."""
        kind, image_fields = self.input_section.read() if input_image else (GenerateRequest, {})
        size = self.query_one("#size", Select).value
        if size == INPUT_SIZE and kind is GenerateRequest and input_image:
            raise RequestError("size", "the input image's size needs an operation on an input image; pick a size")
        if not self._input("#model"):  # the request's default model (demo) would be a surprise
            raise RequestError("model", f"empty; use {MODEL_NAMES}")
        preset = self.query_one("#preset", Select).value
        values = {
            "prompt": self.query_one("#prompt", TextArea).text,  # as typed: spaces and newlines are the user's
            "negative_prompt": self.query_one("#negative_prompt", TextArea).text,
            **{name: self._input(f"#{name}") for name in _TEXT_FIELDS},
            **{name: str(self.query_one(f"#{name}", Select).value) for name in _SELECT_FIELDS},
            "size": self._input("#size-custom") if size == CUSTOM_SIZE else None if size == INPUT_SIZE else str(size),
            "seed": "-1" if self.query_one("#seed-random", Checkbox).value else self._input("#seed"),
            "styles": list(self.query_one(StylePicker).selected),
            "preset": None if preset == Select.NULL else str(preset),
            "expand": self.query_one("#expand", Checkbox).value,
            "guidance": {f.name: self._input(f"#g-{f.name}") for f in fields(GuidanceSettings)},
            "image_prompts": self.references.read(),
            **self._carried,
            **image_fields,
        }
        return request_builder.build(values, defaults={}, kind=kind)

    # -- errors ------------------------------------------------------------
    def clear_errors(self) -> None:
        self._error_values.clear()
        for field in self.query(Field):
            field.set_error(None)
        self.query_one("#form-error", Static).update("")

    def show_error(self, exc: DreamttyError) -> None:
        """Show a one-line error next to the field it names (else at the top of the form)."""
        if isinstance(exc, RequestError):
            exc = self.references.placed(exc)
        exc = self._model_origin(exc)
        name, message = field_and_message(exc)
        field = next((f for f in self.query(Field) if name in f.names), None)
        if field is None:
            self.query_one("#form-error", Static).update(plain(exc))
            self.scroll_home()
            return
        field.set_error(message)
        self._error_values[field] = _field_values(field)
        for group in field.ancestors:
            if isinstance(group, Collapsible):
                group.collapsed = False
        # The text box the error names (an image prompt's weight), else a text box where there is one (a custom
        # size's WxH rather than the size list).
        target = next((w for kind in (f"Input#{name}, TextArea#{name}", "Input, TextArea", "Select")
                       for w in field.query(kind) if not w.disabled), None)
        (target or field).focus()
        # scrolled once the group it opens is laid out: two refreshes (after one, a group in the middle of the form
        # had its old height, and the error stayed below the form at 80x24)
        self.call_after_refresh(self.call_after_refresh, self._scroll_whole, field)

    def _scroll_whole(self, field: Field) -> None:
        """Scroll ``field`` (laid out with its error, its group open) whole into view. Textual's ``scroll_visible``
        leaves out a group's padding: an error's last line stayed below the form."""
        offset = Region.get_scroll_to_visible(self.scrollable_content_region, field.region)
        self.scroll_relative(offset.x, offset.y, animate=False, immediate=True)

    # -- filling the form ----------------------------------------------------
    def fill(self, data: dict, kind: str | None = None) -> None:
        """Set the fields named in ``data`` (request field names; as from ``to_dict``). With ``kind`` (a job
        kind's name) ``data`` is a whole request of that kind, and the Input image section shows it too."""
        q = self.query_one
        with self.prevent(Select.Changed, Input.Changed, Checkbox.Changed):
            if kind is not None:
                self.input_section.fill(kind, data)
                if self.input_section.operation != NONE:  # shown: ctrl+g queues that operation
                    self._open_input_image()
            for name in ("prompt", "negative_prompt"):
                if name in data:
                    q(f"#{name}", TextArea).text = data[name] or ""
            for name in ("model", "cfg", "count", "vae", "refiner", "refiner_switch"):
                if name in data:
                    value = data[name]
                    q(f"#{name}", Input).value = "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
            for name, allowed in (("dtype", DTYPES), ("speed", SPEEDS)):
                if data.get(name) in allowed:
                    q(f"#{name}", Select).value = data[name]
            # Which [[a,b]] variant and the batch the image was denoised in: kept for reproduce.
            self._carried = {name: data.get(name) for name in ("index", "batch", "max_batch")}
            if "image_prompts" in data:
                self.references.fill(data["image_prompts"] or [])
            if "steps" in data:
                q("#steps", Input).value = "" if data["steps"] is None else str(data["steps"])
                q("#performance", Select).value = performance_of(data)
            if data.get("sampler") in SAMPLERS:
                q("#sampler", Select).value = data["sampler"]
                self._set_schedules(data["sampler"], data.get("scheduler"))
            elif "scheduler" in data:
                self._set_schedules(str(q("#sampler", Select).value), data["scheduler"])
            if "seed" in data:
                self._set_seed(data["seed"])
            if data.get("width") and data.get("height"):
                self._set_size(data["width"], data["height"])
            if "styles" in data:
                self.query_one(StylePicker).set_selected(data["styles"] or [])
            if "preset" in data:  # a preset that no longer exists is left out
                known = data["preset"] in {p.name for p in self.presets}
                q("#preset", Select).value = data["preset"] if known else Select.NULL
            if "expand" in data:
                q("#expand", Checkbox).value = bool(data["expand"])
            if "loras" in data:
                q("#loras", Input).value = request_builder.loras_text(data["loras"] or [])
            guidance = GuidanceSettings.from_dict(data["guidance"]) if data.get("guidance") else None
            for f in fields(GuidanceSettings) if guidance is not None else ():
                q(f"#g-{f.name}", Input).value = format_guidance_value(getattr(guidance, f.name))
        if "model" in data:
            self.update_family(data["model"])
        self.clear_errors()

    def fill_preset(self, name: str) -> None:
        """Load preset ``name`` into the form, read in a thread (a model named on the command line stays)."""
        self._preset_wanted = name
        self._read_preset(name)

    @work(thread=True, exclusive=True, group="preset")
    def _read_preset(self, name: str) -> None:
        try:
            values = request_builder.layered({"model": self.model} if self.keep_model else {}, name, defaults={})
        except DreamttyError as exc:
            self.app.call_from_thread(self._preset_read, name, {}, exc)
        else:
            self.app.call_from_thread(self._preset_read, name, values, None)

    def _preset_read(self, name: str, values: dict, error: DreamttyError | None) -> None:
        self.ready.set()  # the default preset (the first read) is in the form, or was replaced, or failed
        if name != self._preset_wanted:
            return  # another preset was chosen since
        if error is not None:
            with self.prevent(Select.Changed):  # the form does not claim a preset it could not load
                self.query_one("#preset", Select).value = Select.NULL
            self.show_error(error)
            return
        self.fill(values)

    @work(thread=True, exclusive=True, group="presets", exit_on_error=False)
    def load_presets(self, selected: str | None = None, apply: bool = False) -> None:
        """List the presets (in a thread) and select ``selected``: with ``apply`` by loading it into the form,
        else without refilling the form (it was just saved from there)."""
        presets = list_presets()
        self.app.call_from_thread(self._presets_listed, presets, selected, apply)

    def _presets_listed(self, presets: list[PresetInfo], selected: str | None, apply: bool) -> None:
        self.presets = presets
        select = self.query_one("#preset", Select)
        with self.prevent(Select.Changed):
            select.set_options(_preset_options(presets))
            if selected in {p.name for p in presets} and not apply:
                select.value = selected
        if selected and apply:
            self.fill_preset(selected)

    def _set_seed(self, seed: int) -> None:
        random_seed = int(seed) == -1
        self.query_one("#seed-random", Checkbox).value = random_seed
        seed_input = self.query_one("#seed", Input)
        seed_input.disabled = random_seed
        if not random_seed:
            seed_input.value = str(seed)

    def _set_size(self, width: int, height: int) -> None:
        size = self.query_one("#size", Select)
        value = _size_value(width, height)
        known = value in {v for _, v in _size_options(self.family)}
        size.value = value if known else CUSTOM_SIZE
        custom = self.query_one("#size-custom", Input)
        custom.disabled = known
        custom.value = "" if known else value

    def _set_schedules(self, sampler: str, wanted: str | None = None) -> None:
        allowed = SAMPLERS[sampler].schedules
        select = self.query_one("#scheduler", Select)
        current = wanted or select.value
        select.set_options([(s, s) for s in allowed])
        select.value = current if current in allowed else SAMPLERS[sampler].default_schedule

    # -- model family ----------------------------------------------------
    @work(thread=True, exclusive=True, group="model-choices", exit_on_error=False)
    def _load_model_choices(self) -> None:
        """Let the Model field complete the library's checkpoints and finished full DreamBooth runs too."""
        trained = [str(run.path) for run in list_runs() if run.state == "done" and trained_model(run.path)]
        choices = [*DEMO_MODELS, *library.names("checkpoint"), *trained]
        self.app.call_from_thread(setattr, self.query_one("#model", Input).suggester, "choices", choices)

    def follow_default_model(self, new: str) -> None:
        """The default model changed (Models screen): use it, unless another model than the old default is set."""
        if self._input("#model") == self.model:
            self.query_one("#model", Input).value = new  # Input.Changed updates the family and the sizes
        self.model = new
        self._load_model_choices()

    def update_family(self, model: str) -> None:
        self._resolve_family(model.strip())

    @work(thread=True, exclusive=True, group="family", exit_on_error=False)
    def _resolve_family(self, model: str) -> None:
        try:
            family, problem = resolve_model(model).family, None
        except DreamttyError as exc:
            family, problem = "", exc
        self.app.call_from_thread(self._set_family, model, family, problem)

    def _set_family(self, model: str, family: str, problem: DreamttyError | None) -> None:
        if model != self._input("#model"):
            return  # typed on since
        model_field = self.query_one("#model", Input).parent
        if problem is not None:
            model_field.set_hint(field_and_message(self._model_origin(problem))[1])
            return
        label = FAMILIES[family].label if family in FAMILIES else "unknown family (sizes for SDXL)"
        model_field.set_hint(label)
        if family == self.family:
            return
        self.family = family
        size = self.query_one("#size", Select)
        kept = size.value if size.value in (CUSTOM_SIZE, INPUT_SIZE) else None
        current = str(size.value)
        options = _size_options(family)
        with self.prevent(Select.Changed):
            size.set_options(options)  # this picks the first option: put the size back
            if kept:  # what was typed stays, checked when the form is read
                size.value = kept
        if not kept:
            self._set_size(*parse_size(current if current in {v for _, v in options} else options[0][1]))

    def _model_origin(self, exc: DreamttyError) -> DreamttyError:
        """``exc``, when it is about the model the Model field holds as the config's ``default_model`` (no
        ``--model`` given), saying where that came from (the CLI says it so)."""
        if self.app.model_given or self._input("#model") != self.app.default_model or not str(exc).startswith("model:"):
            return exc
        return noted(exc, f" ({self.app.config.origin('default_model')})")

    # -- reacting to the user ----------------------------------------------
    @on(Input.Changed)
    @on(TextArea.Changed)
    @on(Select.Changed)
    def _edited(self, event: Input.Changed | TextArea.Changed | Select.Changed) -> None:
        """A field edited since its error was shown: the error is stale, clear it."""
        for field in event.control.ancestors:
            if field in self._error_values and _field_values(field) != self._error_values[field]:
                del self._error_values[field]
                field.set_error(None)

    @on(Input.Changed, "#model")
    def _model_changed(self, event: Input.Changed) -> None:
        self.update_family(event.value)

    @on(Select.Changed, "#in-operation")
    def _operation_changed(self, event: Select.Changed) -> None:
        """An operation on the input image takes the image's size; none goes back to the family's default size."""
        self.input_section.show_operation(str(event.value))
        self._size_from_input(event.value != NONE)

    @on(Input.Changed, "#in-image")
    def _image_changed(self) -> None:
        if self.input_section.operation != NONE:
            self._size_from_input(True)

    def _size_from_input(self, from_input: bool) -> None:
        size = self.query_one("#size", Select)
        if from_input:
            size.value = INPUT_SIZE
        elif size.value == INPUT_SIZE:
            size.value = _size_options(self.family)[0][1]

    def use_input_image(self, path: str) -> None:
        """Put image ``path`` in the Input image section, open it and focus its operation."""
        self.query_one("#in-image", Input).value = path
        self._open_input_image()
        self.query_one("#in-operation", Select).focus()

    def _open_input_image(self) -> None:
        self.query_one("#input-image", Collapsible).collapsed = False

    @on(Select.Changed, "#sampler")
    def _sampler_changed(self, event: Select.Changed) -> None:
        self._set_schedules(str(event.value))

    @on(Select.Changed, "#size")
    def _size_changed(self, event: Select.Changed) -> None:
        custom = self.query_one("#size-custom", Input)
        custom.disabled = event.value != CUSTOM_SIZE
        if not custom.disabled:
            custom.focus()

    @on(Checkbox.Changed, "#seed-random")
    def _random_changed(self, event: Checkbox.Changed) -> None:
        seed = self.query_one("#seed", Input)
        seed.disabled = event.value
        if not event.value:
            seed.focus()

    @on(Select.Changed, "#preset")
    def _preset_changed(self, event: Select.Changed) -> None:
        self.clear_errors()  # those the last preset left (one that loads clears them too)
        if event.value == Select.NULL:
            self._preset_wanted = None
        else:
            self.fill_preset(str(event.value))

    @on(Select.Changed, "#performance")
    def _performance_changed(self, event: Select.Changed) -> None:
        choice = event.value
        field = self.query_one("#performance", Select).parent
        if choice == "extreme" and not few_step_allowed(self._input("#model"), self._input("#loras")):
            field.set_error(f"Extreme speed needs a model or LoRA named {', '.join(FEW_STEP_WORDS[:-1])} or "
                            f"{FEW_STEP_WORDS[-1]} (a few-step one); neither the model nor the LoRAs are")
            with self.prevent(Select.Changed):
                event.select.value = self._performance or Select.NULL
            return
        field.set_error(None)
        self._performance = None if choice == Select.NULL else str(choice)
        if self._performance is None:
            return
        self.query_one("#steps", Input).value = str(PERFORMANCE[self._performance][1])
        if self._performance == "extreme":
            self.fill({"sampler": "lcm", "scheduler": "sgm_uniform", "cfg": 1.0})
