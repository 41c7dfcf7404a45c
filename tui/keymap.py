"""Key bindings with ids, so users can remap them.

Remap in the config file (``backend.config``, ``<config dir>/config.yaml``)::

    keymap:
      generate: f5
      screen.queue: f6

Keys are Textual key names (``ctrl+g``, ``f1``, ``delete``, ``l``); several
keys for one binding are separated by commas.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


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
    Key("cancel", "ctrl+x", "cancel_running", "Cancel job", "Cancel the running job", priority=True),
    Key("screen.generate", "f1", "switch_mode('generate')", "Generate", "Show the Generate screen", False, True),
    Key("screen.queue", "f2", "switch_mode('queue')", "Queue", "Show the Queue & gallery screen", False, True),
    Key("screen.train", "f3", "switch_mode('train')", "Train", "Show the Train screen", False, True),
    Key("screen.models", "f4", "switch_mode('models')", "Models", "Show the Models screen", False, True),
    Key("quit", "ctrl+q", "quit", "Quit", "Quit dreamtty (asks first while jobs run)", priority=True),
    Key("help", "f12", "toggle_help", "Keys", "Show or hide the keys of the focused widget and screen", priority=True),
)

GENERATE_KEYS = (
    Key("preset.save", "ctrl+o", "save_preset", "Save preset", "Save the Generate form as a preset", priority=True),
)

QUEUE_KEYS = (
    Key("queue.cancel", "c", "cancel_selected", "Cancel selected", "Cancel the selected queued or running job"),
    Key("gallery.load", "l", "load_parameters", "Load params", "Load the selected image's parameters into the form"),
    Key("gallery.reproduce", "r", "reproduce", "Reproduce", "Queue the selected image's parameters again"),
    Key("gallery.copy", "y", "copy_path", "Copy path", "Copy the selected image's path to the clipboard"),
)

ALL_KEYS = APP_KEYS + GENERATE_KEYS + QUEUE_KEYS


def bindings(keys: tuple[Key, ...]) -> list[Binding]:
    return [Binding(k.key, k.action, k.description, show=k.show, priority=k.priority, id=k.id, tooltip=k.help)
            for k in keys]

