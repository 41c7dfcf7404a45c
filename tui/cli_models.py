"""``dreamtty models list|pull`` and ``dreamtty config path|check``."""

from __future__ import annotations

import json
import sys

from backend import config, downloads, library
from backend.errors import RequestError
from backend.families import family_label
from backend.safetext import error_line, one_line, visible
from tui.cli_output import given


def companions_targets() -> tuple[str, ...]:
    from backend.companions import PULL_TARGETS

    return PULL_TARGETS


def format_table(lib: library.Library) -> str:
    """The ``models list`` text: one section per kind, then the skipped files; a row per item (control
    characters and newlines shown escaped)."""
    lines = []
    for kind in library.KINDS:
        entries = lib.of_kind(kind)
        lines.append(f"{kind}s ({len(entries)})")
        for e in entries:
            size = downloads.human(e.size) if e.size else "-"
            note = f"  [{e.note}]" if e.note else ""
            if e.variant and kind in library.COMPANION_KINDS:  # what it serves: image, face, canny, photo, ...
                note = f"  [{e.variant}{'; ' + e.note if e.note else ''}]"
            lines.append(f"  {one_line(e.name):<36} {one_line(family_label(e.family)):<24} {size:>9}  "
                         f"{one_line(e.source)}{one_line(note)}")
    if lib.problems:
        lines.append(f"skipped ({len(lib.problems)})")
        lines += [f"  {one_line(p)}" for p in lib.problems]
    return "\n".join(lines)


def cmd_list(args) -> int:
    cfg = config.load()
    lib = library.discover(cfg)
    if args.json:
        print(json.dumps({"models": [e.to_dict() for e in lib.entries], "problems": lib.problems}))
        return 0
    print(format_table(lib))
    if all(e.source == "built-in" for e in lib.of_kind("checkpoint")):
        folders = ", ".join(visible(p) for p in cfg.folders("checkpoints"))
        print(f"\nNo models found besides the demo ones; put checkpoints in {folders} or pull one.")
        print(downloads.recommended_text())
    return 0


def cmd_pull(args) -> int:
    if args.target is not None:
        return _pull_for(args)
    if args.id is None:
        raise RequestError("id", "give a Hugging Face id, or --for with what to get the models for")
    path = downloads.pull(args.id, revision=args.revision, filename=args.file)
    print(one_line(path))
    if not args.file:
        name = args.id
    else:  # as the library names it (owner/repo/name when one of the user's files has its name), else by its path
        listed = library.discover(kinds=("checkpoint",), hub=False).of_kind("checkpoint")
        name = next((e.name for e in listed if e.path == str(path)), None) or (
            path.stem if "/" not in args.file.strip("/") else str(path))
    print(f"use it with: dreamtty generate \"...\" --model {visible(name)}", file=sys.stderr)
    return 0


def _pull_for(args) -> int:
    """Download the usual models for image prompts (a type, or all) or describe into the model library."""
    from backend import companions

    if args.id is not None or args.file is not None:
        raise RequestError("for", "takes no id or --file: it knows which repositories to get")
    cfg = config.load()
    wanted = companions.usual_for(args.target, args.family)
    if not wanted:  # structure: no model is published for it
        from backend.image_prompts import TYPES

        folder = library.FOLDER_OF_KIND[TYPES[args.target].model]
        raise RequestError("for", f"none is known to download for {args.target} ({args.family}); put one made for it "
                                  f"in the {folder} folder (docs/image-prompts.md)")
    for usual in wanted:
        folder = usual.folder(cfg)
        print(f"dreamtty: {usual.kind.replace('_', ' ')} ({usual.variant or 'any'}): {usual.repo} "
              f"(about {usual.size}) into {visible(folder)}", file=sys.stderr)
        downloads.pull(usual.repo, revision=args.revision, patterns=usual.files, local_dir=folder)
        print(one_line(folder))
    return 0


def cmd_config_path(args) -> int:
    """The config file's path; why its defaults apply, once: the config's warning, printed as the command
    started, or that it does not exist yet."""
    path = config.config_path()
    print(one_line(path))
    if not config.load().unread and not path.exists():  # a symlink loop is unread, not missing
        print("(it does not exist yet: the defaults apply)", file=sys.stderr)
    return 0


def cmd_config_check(args) -> int:
    """Every problem of the config, whole: the file's (printed as every command starts) and its keymap's (only the
    TUI reads it, where a long list is cut); exit 1 when there is one."""
    from tui.keymap import check_keymap

    cfg = config.load()
    problems = [*cfg.warnings, *(f"config: {w}" for w in check_keymap(cfg.keymap)[1])]
    for problem in problems[len(cfg.warnings):]:
        print(f"dreamtty: {error_line(problem)}", file=sys.stderr)
    where = cfg.source or config.config_path()
    print(f"config: {len(problems)} problem(s) in {one_line(where)}" if problems
          else f"config: no problems in {one_line(where)}")
    return 1 if problems else 0


def register(sub) -> None:
    about = "list models and pull them from the Hugging Face Hub"
    models = sub.add_parser("models", help=about, description=about)
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=type(models))
    ls = msub.add_parser("list", help="checkpoints, LoRAs, VAEs, embeddings, upscalers and image-prompt models found")
    ls.add_argument("--json", action="store_true", help="one JSON object: models and skipped files (problems)")
    ls.set_defaults(func=cmd_list)
    pull = msub.add_parser("pull", help="download a Hugging Face model (or one file of it) into the cache")
    pull.add_argument("id", nargs="?", help="Hugging Face repo id, e.g. stabilityai/stable-diffusion-xl-base-1.0")
    pull.add_argument("--revision", type=given, help="branch, tag or commit")
    pull.add_argument("--file", type=given, help="one file of the repo (e.g. a single-file .safetensors checkpoint)")
    pull.add_argument("--for", dest="target", choices=companions_targets(),
                      help="instead of an id: the usual models for image prompts (all types, or one) or describe, "
                           "into the model library")
    pull.add_argument("--family", choices=("sd1", "sdxl"), default="sdxl",
                      help="with --for: the models' family (default sdxl)")
    pull.set_defaults(func=cmd_pull)
    cfg = sub.add_parser("config", help="the configuration file")
    csub = cfg.add_subparsers(dest="config_command", required=True, parser_class=type(cfg))
    path = csub.add_parser("path", help="print where the config file is read from")
    path.set_defaults(func=cmd_config_path)
    check = csub.add_parser("check", help="print every problem of the config file, its keymap's too (exit 1 if any)")
    check.set_defaults(func=cmd_config_check)
