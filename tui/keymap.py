"""Key bindings with ids, so users can remap them.

Remap in the config file (``backend.config``, ``<config dir>/config.yaml``)::

    keymap:
      generate: f5
      screen.queue: f8

Keys are Textual key names (``ctrl+g``, ``f1``, ``delete``, ``l``); several
keys for one binding are separated by commas. :func:`check_keymap` drops what cannot work (an
unknown binding id, a key name Textual does not know) with a warning, and warns of a key that two
bindings of one screen share.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.keys import REPLACED_KEYS, Keys, key_to_character


@dataclass(frozen=True)
class Key:
    id: str
    key: str
    action: str
    description: str  # short: footer
    help: str  # longer: command palette
    show: bool = True
    priority: bool = False


# Priority keys work even while a text field has focus (TextArea binds ctrl+x to cut, f6 and f7).
APP_KEYS = (
    Key("generate", "ctrl+g", "generate", "Generate", "Queue a generation with the Generate form", priority=True),
    Key("cancel", "ctrl+x", "cancel_running", "Cancel job", "Cancel this terminal's newest running job",
        priority=True),
    Key("screen.generate", "f1", "switch_mode('generate')", "Generate", "Show the Generate screen", False, True),
    Key("screen.queue", "f2", "switch_mode('queue')", "Queue", "Show the Queue & gallery screen", False, True),
    Key("screen.train", "f3", "switch_mode('train')", "Train", "Show the Train screen", False, True),
    Key("screen.models", "f4", "switch_mode('models')", "Models", "Show the Models screen", False, True),
    Key("quit", "ctrl+q", "quit", "Quit", "Quit dreamtty (asks first while jobs run)", priority=True),
    Key("help", "f12", "toggle_help", "Keys", "Show or hide the keys of the focused widget and screen", priority=True),
)

GENERATE_KEYS = (
    Key("preset.save", "ctrl+o", "save_preset", "Save preset", "Save the Generate form as a preset", priority=True),
    Key("mask.edit", "ctrl+t", "edit_mask", "Edit mask", "Paint the inpaint mask of the Input image", show=False,
        priority=True),
    Key("describe", "f6", "describe_input", "Describe", "Describe the Input image into the prompt (a captioner)",
        show=False, priority=True),
    Key("load_input", "f7", "load_input_parameters", "Load params", "Load the Input image's parameters (dreamtty, "
        "A1111 or Fooocus metadata) into the form", show=False, priority=True),
)

QUEUE_KEYS = (
    Key("queue.cancel", "c", "cancel_selected", "Cancel selected", "Cancel the selected queued or running job"),
    Key("gallery.describe", "d", "describe", "Describe", "Describe the selected image into the Generate prompt",
        show=False),
    Key("gallery.load", "l", "load_parameters", "Load params", "Load the selected image's parameters into the form"),
    Key("gallery.reproduce", "r", "reproduce", "Reproduce", "Queue the selected image's parameters again"),
    Key("gallery.copy", "y", "copy_path", "Copy path", "Copy the selected image's path to the clipboard"),
    Key("gallery.vary_subtle", "v", "on_image('vary_subtle')", "Vary",
        "Vary the selected image, subtle (strength 0.5)"),
    Key("gallery.vary_strong", "V", "on_image('vary_strong')", "Vary strong",
        "Vary the selected image, strong (strength 0.85)", show=False),
    Key("gallery.upscale", "u", "on_image('upscale_1.5')", "Upscale", "Upscale the selected image 1.5×"),
    Key("gallery.upscale_2", "U", "on_image('upscale_2')", "Upscale 2×", "Upscale the selected image 2×", show=False),
    Key("gallery.inpaint", "i", "inpaint", "Inpaint", "Paint a mask on the selected image and inpaint it"),
    Key("gallery.outpaint_left", "H", "on_image('outpaint_left')", "Outpaint left",
        "Outpaint the selected image: widen it on the left", show=False),
    Key("gallery.outpaint_right", "L", "on_image('outpaint_right')", "Outpaint right",
        "Outpaint the selected image: widen it on the right", show=False),
    Key("gallery.outpaint_top", "K", "on_image('outpaint_top')", "Outpaint top",
        "Outpaint the selected image: extend it at the top", show=False),
    Key("gallery.outpaint_bottom", "J", "on_image('outpaint_bottom')", "Outpaint bottom",
        "Outpaint the selected image: extend it at the bottom", show=False),
    Key("gallery.input", "e", "use_as_input", "Use as input", "Put the selected image in the Generate screen's "
        "Input image section", show=False),
)

# The mask editor: a brush moved in preview pixels (shifted: several at a time), paint, erase, a pen that
# paints or erases while moving, rectangles, and the feather of the inpaint job.
MASK_KEYS = (
    Key("mask.left", "left,h", "move(-1,0)", "Left", "Mask editor: move the brush left", show=False),
    Key("mask.right", "right,l", "move(1,0)", "Right", "Mask editor: move the brush right", show=False),
    Key("mask.up", "up,k", "move(0,-1)", "Up", "Mask editor: move the brush up", show=False),
    Key("mask.down", "down,j", "move(0,1)", "Down", "Mask editor: move the brush down", show=False),
    Key("mask.far_left", "shift+left,H", "move_far(-1,0)", "Far left", "Mask editor: move the brush far left",
        show=False),
    Key("mask.far_right", "shift+right,L", "move_far(1,0)", "Far right", "Mask editor: move the brush far right",
        show=False),
    Key("mask.far_up", "shift+up,K", "move_far(0,-1)", "Far up", "Mask editor: move the brush far up", show=False),
    Key("mask.far_down", "shift+down,J", "move_far(0,1)", "Far down", "Mask editor: move the brush far down",
        show=False),
    Key("mask.paint", "space", "stroke(True)", "Paint", "Mask editor: paint under the brush (or fill the rectangle)"),
    Key("mask.erase", "x", "stroke(False)", "Erase", "Mask editor: erase under the brush (or the rectangle)"),
    Key("mask.pen", "p", "pen", "Pen", "Mask editor: pen up / painting / erasing while the brush moves"),
    Key("mask.bigger", "plus,equals_sign,right_square_bracket", "brush(1)", "Bigger", "Mask editor: bigger brush",
        show=False),
    Key("mask.smaller", "minus,left_square_bracket", "brush(-1)", "Smaller", "Mask editor: smaller brush",
        show=False),
    Key("mask.rectangle", "r", "rectangle", "Rectangle",
        "Mask editor: start (or drop) a rectangle at the brush; paint or erase fills it"),
    Key("mask.invert", "i", "invert", "Invert", "Mask editor: invert the mask", show=False),
    Key("mask.clear", "c", "clear", "Clear", "Mask editor: clear the mask", show=False),
    Key("mask.feather_more", "f", "feather(1)", "Feather +", "Mask editor: wider feather (soft edge)", show=False),
    Key("mask.feather_less", "F", "feather(-1)", "Feather -", "Mask editor: narrower feather", show=False),
    Key("mask.apply", "enter", "apply", "Use mask", "Mask editor: save the mask and use it"),
    Key("mask.cancel", "escape", "cancel", "Cancel", "Mask editor: close without using the mask"),
)

TRAIN_KEYS = (
    Key("train.start", "ctrl+s", "start_run", "Start run", "Start a training run with the Train form", priority=True),
    Key("train.stop", "ctrl+t", "stop_run", "Stop run", "Stop the selected run after its step (keeps a checkpoint)",
        priority=True),
    Key("train.resume", "ctrl+r", "resume_run", "Resume run",
        "Continue the selected stopped or failed run from its newest checkpoint", priority=True),
)

MODELS_KEYS = (
    Key("models.default", "d", "set_default", "Set default", "Make the selected checkpoint the default model"),
    Key("models.refresh", "r", "refresh", "Rescan", "Scan the model folders again"),
    Key("models.pull", "p", "focus_pull", "Pull", "Type a Hugging Face id to download"),
)

ALL_KEYS = APP_KEYS + GENERATE_KEYS + QUEUE_KEYS + MASK_KEYS + TRAIN_KEYS + MODELS_KEYS


def bindings(keys: tuple[Key, ...]) -> list[Binding]:
    return [Binding(k.key, k.action, k.description, show=k.show, priority=k.priority, id=k.id, tooltip=k.help)
            for k in keys]


# Bindings active together: the app's keys are live on every screen.
GROUPS = tuple(APP_KEYS + keys for keys in (GENERATE_KEYS, QUEUE_KEYS, MASK_KEYS, TRAIN_KEYS, MODELS_KEYS))
_MODIFIERS = ("ctrl", "shift", "alt", "meta", "super", "hyper")
_NAMED = {key.value for key in Keys if "+" not in key.value and not key.value.startswith("<")}


def known_key(name: str) -> bool:
    """Whether ``name`` is a key Textual can report: modifiers, then a named key (``f5``, ``escape``),
    a character, or a character's name (``plus``, ``equals_sign``). A control character is none of them
    (``ctrl+\\x1b`` showed as ``^\\x1b`` in the mode bar)."""
    *modifiers, base = name.split("+")
    if not base or not name.isprintable() or any(m not in _MODIFIERS for m in modifiers):
        return False
    return base in _NAMED or len(base) == 1 or key_to_character(REPLACED_KEYS.get(base, base)) is not None


def types_text(name: str) -> bool:
    """Whether key ``name`` (a known one) types a character in a text box: a printable one, no modifier."""
    character = key_to_character(REPLACED_KEYS.get(name, name))
    return "+" not in name and character is not None and character.isprintable()


def check_keymap(user: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The user's keymap without the entries that cannot work, and a warning for each one dropped
    (its default stays) and for each key that two bindings active together now share. A key that types
    text cannot work for a priority binding (it reaches the app from every text box): dropped too."""
    defaults = {key.id: key.key for key in ALL_KEYS}
    priority = {key.id for key in ALL_KEYS if key.priority}
    kept: dict[str, str] = {}
    warnings = []
    for binding_id, keys in user.items():
        names = [k.strip() for k in keys.split(",")]
        bad = next((k for k in names if not known_key(k)), None)
        typed = next((k for k in names if types_text(k)), None) if binding_id in priority else None
        if binding_id not in defaults:
            warnings.append(f"keymap: {binding_id!r} is not a binding id (the ids are listed in docs/tui.md)")
        elif bad is not None:
            warnings.append(f"keymap.{binding_id}: {bad!r} is not a key name (e.g. ctrl+g, f5, escape, x); "
                            f"keeping {defaults[binding_id]}")
        elif typed is not None:
            warnings.append(f"keymap.{binding_id}: {typed!r} types text, and this binding would take it from every "
                            f"text box (use ctrl+, alt+ or an f key); keeping {defaults[binding_id]}")
        else:
            kept[binding_id] = ",".join(names)
    for group in GROUPS:
        owners: dict[str, str] = {}
        for key in group:
            for name in kept.get(key.id, key.key).split(","):
                other = owners.setdefault(name.strip(), key.id)
                if other == key.id or not (key.id in kept or other in kept):
                    continue
                mine, theirs = (key.id, other) if key.id in kept else (other, key.id)  # the remapped one first
                clash = f"keymap.{mine}: {name.strip()} is also the key of {theirs}"
                if clash not in warnings:
                    warnings.append(clash)
    return kept, warnings
