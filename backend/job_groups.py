"""Which queued jobs run together: jobs of a kind that denoises several images at once (text to image),
alike in everything their images share in a batch (model, extras, size, sampler, steps, guidance, speed),
go to one worker as a group. The worker denoises the group's images in shared batches
(``backend.worker.run_jobs``); each job keeps its own prompts, seeds, outputs and end (done, failed or
cancelled: a cancelled job leaves its group-mates running).

No torch here: the service groups jobs, and the engine asks :func:`one_at_a_time` too.
"""

from __future__ import annotations

import json

from backend import jobkinds
from backend.errors import DreamttyError
from backend.extras_check import effective_request
from backend.queue_store import Job
from backend.request import GenerateRequest

# Images a group holds, and a batch on CUDA, at most by default: past it, images/s hardly grow and the first
# image waits (backend.engine.batching).
GROUP_IMAGES = 8
GROUP_SCAN = 256  # the oldest queued jobs looked at for a group: a queue of thousands is not read at each dispatch
# What each image of a batch has of its own (generate_batch): prompts, seed, position, its prompt's styles
# and expansion. Everything else of the request is shared by the batch, so a group's jobs must agree on it.
OWN_FIELDS = frozenset({"prompt", "negative_prompt", "seed", "count", "index", "styles", "preset", "expand"})


def one_at_a_time(request: GenerateRequest) -> str | None:
    """Why the images of ``request`` cannot share a batch, or None when they can."""
    if request.guidance.sag:
        return "sag: its extra UNet call depends on each image's attention, so images run one at a time"
    if any(p.active for p in request.image_prompts):
        return "image prompts: images run one at a time"
    return None


def group_key(job: Job) -> str | None:
    """What ``job`` shares with the jobs it may run with, or None when it runs alone: a kind that makes one
    image at a time, SAG or image prompts, a reproduce of a batch, a retry (a job that took its worker down
    must not take its group-mates' tries too), or a stored request that no longer reads (its worker says why).
    A prompt's ``<lora:...>`` tags count as the LoRAs they name."""
    try:
        kind = jobkinds.get(job.kind)
        if kind.make_batch is None or job.attempts or job.request.get("batch") is not None:
            return None
        request = effective_request(kind.request(job.request))
    except (DreamttyError, TypeError, ValueError):
        return None
    if one_at_a_time(request):
        return None
    shared = {name: value for name, value in request.to_dict().items() if name not in OWN_FIELDS}
    return json.dumps([job.kind, job.payload.get("family"), shared], sort_keys=True, default=str)


def images_left(job: Job) -> int:
    return max(0, int(job.request.get("count", 1)) - len(job.outputs))


def group_of(first: Job, queued: list[Job]) -> list[Job]:
    """``first`` and the jobs of ``queued`` (oldest first) that may join it, in queue order, while their
    images left add up to at most its ``max_batch`` (default :data:`GROUP_IMAGES`)."""
    key = group_key(first)
    if key is None:
        return [first]
    room = (first.request.get("max_batch") or GROUP_IMAGES) - images_left(first)
    group = [first]
    for job in queued:  # the key first: it refuses a count that does not read
        if job.id != first.id and group_key(job) == key and 0 < images_left(job) <= room:
            group.append(job)
            room -= images_left(job)
    return group
