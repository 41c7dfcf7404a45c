"""Downloading models from the Hugging Face Hub into its local cache (no torch).

``pull`` asks the Hub for the repo's file list and sizes, checks free disk
space, downloads with ``huggingface_hub`` (which resumes an interrupted
download from its ``.incomplete`` file), then checks each file's size and,
for LFS files, its SHA-256. The Hub client is injectable so tests never touch
the network.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend.errors import DreamttyError, RequestError, Transient
from backend.safetext import first_line
from backend.user_files import file_sha256

# The files a diffusers folder needs: configs, tokenizers and the default (non-variant) safetensors weights.
DIFFUSERS_PATTERNS = (
    "model_index.json", "*/*.json", "*/*.txt", "*/*.model",
    "*/diffusion_pytorch_model.safetensors", "*/model.safetensors",
)
EXCLUDED_FOLDERS = ("safety_checker/", "feature_extractor/")


@dataclass(frozen=True)
class Recommended:
    repo: str
    file: str | None
    label: str
    size: str  # approximate, shown when offline


RECOMMENDED = (
    Recommended("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors", "SDXL base 1.0", "6.9 GB"),
    Recommended("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", "SD 1.5", "4.3 GB"),
    Recommended("stabilityai/sdxl-turbo", "sd_xl_turbo_1.0_fp16.safetensors", "SDXL Turbo (1-4 steps, cfg 1)", "6.9 GB"),
    Recommended("stabilityai/stable-diffusion-xl-refiner-1.0", "sd_xl_refiner_1.0.safetensors", "SDXL refiner 1.0", "6.1 GB"),
)


def recommended_text() -> str:
    lines = ["Recommended models (dreamtty models pull ID --file FILE):"]
    for r in RECOMMENDED:
        lines.append(f"  {r.label:<30} {r.size:>7}  {r.repo} --file {r.file}")
    return "\n".join(lines)


@dataclass(frozen=True)
class PlannedFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files only


def human(n: float) -> str:
    """A byte count in B, KB, MB, GB or TB (powers of 1000)."""
    units = ("B", "KB", "MB", "GB", "TB")
    power = 0
    while abs(n) >= 1000 and power < len(units) - 1:
        n, power = n / 1000, power + 1
    return f"{n:.1f} {units[power]}" if power else f"{int(n)} B"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


_LOCAL_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)  # the Hub is not at fault


def hub_error(repo: str, exc: Exception, field: str = "pull") -> DreamttyError:
    """The one-line error naming ``field`` for ``exc``, raised fetching ``repo`` from the Hub: a gated, missing or
    private repo says what to do, as does a file that cannot be written here (a full disk, a read-only cache);
    anything else (offline, a timeout) is Transient."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return DreamttyError(f"{field}: {repo} is gated; accept its licence on the Hub and set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return DreamttyError(f"{field}: no model {repo} on the Hub (or it is private: set HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return DreamttyError(f"{field}: {repo} has no such revision")
    if isinstance(exc, OSError) and exc.errno in _LOCAL_WRITE_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return DreamttyError(f"{field}: cannot save {repo} here: {exc.strerror}{where} (free space, or set HF_HOME "
                             "to a writable folder)")
    return Transient(f"{field}: cannot reach the Hugging Face Hub for {repo}: {first_line(exc, 200)}")


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in DIFFUSERS_PATTERNS) and not name.startswith(EXCLUDED_FOLDERS)


def plan(api, repo: str, revision: str | None, filename: str | None,
         patterns: tuple[str, ...] = ()) -> tuple[str, list[PlannedFile]]:
    """(commit sha, files to fetch) for a repo (diffusers layout), one file of it, or the files matching
    ``patterns`` (paths or fnmatch patterns; a plain path the repo lacks is an error)."""
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:
        raise hub_error(repo, exc) from None
    siblings = list(info.siblings or [])
    names = [s.rfilename for s in siblings]
    if patterns:
        missing = [p for p in patterns if not any(ch in p for ch in "*?[") and p not in names]
        if missing:
            raise DreamttyError(f"pull: {repo} has no file {missing[0]}")
        chosen = [s for s in siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
    elif filename:
        chosen = [s for s in siblings if s.rfilename == filename]
        if not chosen:
            files = ", ".join(n for n in names if n.endswith(".safetensors"))[:300] or "none"
            raise DreamttyError(f"pull: {repo} has no file {filename}; .safetensors files: {files}")
    else:
        chosen = [s for s in siblings if s.rfilename in _weights_files(names)]
        if not chosen:
            files = ", ".join(n for n in names if n.endswith(".safetensors") and "/" not in n)[:300] or "none"
            raise DreamttyError(f"pull: {repo} is not a diffusers repo; pick one file with --file (files: {files})")
    out = [
        PlannedFile(s.rfilename, getattr(s, "size", None), getattr(getattr(s, "lfs", None), "sha256", None))
        for s in chosen
    ]
    return info.sha or revision or "main", out


def _weights_files(names: list[str]) -> set[str]:
    """What to fetch of a repo: a diffusers pipeline's files; a single diffusers model (a VAE: its config and
    weights); a LoRA's ``pytorch_lora_weights.safetensors`` or its one top-level .safetensors; else nothing."""
    if "model_index.json" in names:
        return {n for n in names if _wanted(n)}
    if {"config.json", "diffusion_pytorch_model.safetensors"} <= set(names):
        return {"config.json", "diffusion_pytorch_model.safetensors"}
    top = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    if "pytorch_lora_weights.safetensors" in top:
        return {"pytorch_lora_weights.safetensors"}
    return set(top) if len(top) == 1 else set()


def _cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_bytes(path: Path) -> int:
    """Free space on the disk holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def _verify(path: Path, f: PlannedFile) -> None:
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        raise Transient(f"pull: {f.name} has {size} bytes, the Hub says {f.size}; run the pull again to resume")
    if f.sha256 and file_sha256(path) != f.sha256:
        path.unlink(missing_ok=True)
        raise Transient(f"pull: {f.name} does not match its SHA-256; it was removed, run the pull again")


def check_repo_id(repo: str) -> None:
    """Raise RequestError("id") unless ``repo`` has the form of a Hugging Face id (a typo is not a network problem)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise RequestError("id", f"{repo!r} is not a valid Hugging Face id (owner/name)") from None


def pull(
    repo: str,
    revision: str | None = None,
    filename: str | None = None,
    api=None,
    progress: Callable[[int, int, str], None] | None = None,
    tqdm_class=None,
    patterns: tuple[str, ...] = (),
    local_dir: Path | None = None,
) -> Path:
    """Download a diffusers repo (or one file of it, or the files matching ``patterns``) into the HF cache, or
    into ``local_dir`` keeping the repo's layout; returns the local folder or file.

    ``progress(done_bytes, total_bytes, file)`` is called before each file, and once at the end with
    ``file`` empty.
    """
    check_repo_id(repo)
    if api is None:
        if _offline():
            raise DreamttyError(f"pull: HF_HUB_OFFLINE is set, so {repo} cannot be downloaded; unset it where the network allows")
        from huggingface_hub import HfApi

        api = HfApi()
    sha, files = plan(api, repo, revision, filename, patterns)
    cached = {f.name for f in files if _cached(api, repo, f.name, sha, local_dir, f.size)}
    need = sum(f.size or 0 for f in files if f.name not in cached)
    target = local_dir or _cache_root()
    free = free_bytes(target)
    if need > free:
        raise DreamttyError(f"pull: {repo} needs {human(need)} but only {human(free)} is free in {target}")
    total = sum(f.size or 0 for f in files)
    done = 0
    local: Path | None = None
    for f in files:
        if progress:
            progress(done, total, f.name)
        try:
            extra = {"tqdm_class": tqdm_class} if tqdm_class is not None else {}
            if local_dir is not None:
                extra["local_dir"] = str(local_dir)
            local = Path(api.hf_hub_download(repo, f.name, revision=sha, **extra))
        except DreamttyError:
            raise
        except Exception as exc:
            raise hub_error(repo, exc) from None
        if f.name not in cached:
            _verify(local, f)
        done += f.size or 0
    if progress:
        progress(total, total, "")
    if local is None:
        raise DreamttyError(f"pull: {repo} lists no files to download")
    if local_dir is not None:
        return local_dir
    if filename:
        return local
    return local.parents[len(Path(files[-1].name).parts) - 1]


def _cached(api, repo: str, name: str, sha: str, local_dir: Path | None = None, size: int | None = None) -> bool:
    """True when the file of this commit is already complete in the cache (or ``local_dir``: of its size)."""
    if local_dir is not None:
        path = local_dir / name
        return path.is_file() and (size is None or path.stat().st_size == size)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, name, revision=sha, cache_dir=getattr(api, "cache_dir", None))
    except (OSError, ValueError):  # an unreadable cache; HFValidationError
        return False
    return isinstance(found, str)
