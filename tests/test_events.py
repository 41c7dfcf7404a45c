"""One encoding for every event: round trips, versions, and records that are not events."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

from backend import events
from backend.events import EventError, ImageSaved, Preview, Step, TrainStep, dumps, loads

# bytes: a preview's 3x3 RGB pixels, its ints being 3
_SAMPLE = {"int": 3, "float": 0.5, "str": "a\x1b[31m\nb", "bytes": bytes(range(27)), "list[str]": ["x", "y"],
           "list[dict]": [{"model": "m"}], "dict": {"prompt": "p"}}


def _example(cls):
    """An instance of ``cls`` with every field set to a value of its type."""
    return cls(**{f.name: _SAMPLE[f.type.split(" | ")[0]] for f in fields(cls)})


@pytest.mark.parametrize("cls", list(events._TYPES.values()), ids=lambda c: c.type)
def test_every_event_round_trips_as_one_line_of_json(cls):
    event = _example(cls)
    line = dumps(event)
    assert "\n" not in line and "\x1b" not in line  # control characters are escaped on the wire
    assert json.loads(line)["v"] == events.VERSION and json.loads(line)["type"] == cls.type
    assert loads(line) == event


def test_preview_pixels_travel_as_base64():
    event = Preview(job=1, image=0, width=2, height=1, rgb=b"\x00\xff\x10" * 2)
    assert json.loads(dumps(event))["rgb"] == "AP8QAP8Q"
    assert loads(dumps(event)).rgb == event.rgb


@pytest.mark.parametrize("text, error", [
    ('{"v": 2, "type": "done", "job": 1}', "version 2 is not supported"),
    ('{"type": "done", "job": 1}', "version None is not supported"),
    ('{"v": 1, "type": "exploded", "job": 1}', "unknown type 'exploded'"),
    ('{"v": 1, "type": "image", "job": 1, "image": 0, "seed": 1}', "image lacks its 'path' field"),
    ('{"v": 1, "type": "image", "job": 1, "image": 0, "seed": 1, "path": 7}',
     "image's 'path' field holds int, not str"),
    ('{"v": 1, "type": "done", "job": true}', "done's 'job' field holds bool, not int"),
    ('{"v": 1, "type": "done", "job": 1, "paths": [1]}', "done's 'paths' field holds list, not list[str]"),
    ('{"v": 1, "type": "step", "job": 1, "image": 0, "count": 1, "step": "2", "total": 3, "its": 1, "eta": 0}',
     "step's 'step' field holds str, not int"),
    ('{"v": 1, "type": "preview", "job": 1, "image": 0, "width": 1, "height": 1, "rgb": "!!"}',
     "preview's 'rgb' field is not base64"),
    ('{"v": 1, "type": "preview", "job": 1, "image": 0, "width": 2, "height": 1, "rgb": "AP8Q"}',
     "preview has 3 bytes for 2x1 RGB pixels"),
    ('{"v": 1, "type": "step", "job": 1, "image": 0, "count": 1, "step": 0, "total": 0, "its": 1, "eta": 0}',
     "step has total 0 (a step of none)"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"v": 1, "type": "done", "job"', "not JSON"),
    ("[" * 100_000, "not JSON"),
])
def test_records_that_are_not_events_are_one_line_errors(text, error):
    with pytest.raises(EventError, match=re.escape(error)):
        loads(text)


def test_every_field_of_every_event_has_a_checked_type():
    for cls in events._TYPES.values():
        for f in fields(cls):
            assert all(kind in events._HOLDS for kind in f.type.split(" | ")), (cls.type, f.name, f.type)


def test_fields_of_a_newer_minor_version_are_dropped():
    event = loads('{"v": 1, "type": "image", "job": 4, "image": 0, "path": "/x.png", "seed": 9, "new": true}')
    assert event == ImageSaved(job=4, image=0, path="/x.png", seed=9)


def test_training_lines_from_before_versions_read_as_training_events():
    line = '{"type": "step", "time": 1.5, "step": 2, "max_steps": 9, "loss": 0.25}'
    assert loads(line, run_file=True) == TrainStep(time=1.5, step=2, max_steps=9, loss=0.25)
    with pytest.raises(EventError):  # not on a job channel: there an unversioned "step" is no event
        loads(line)
    assert isinstance(loads(dumps(Step(job=1, image=0, count=1, step=1, total=2, its=1.0, eta=1.0))), Step)


def test_a_subscriber_that_may_be_dropped_is_dropped_once_it_stays_a_backlog_behind(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(events.time, "monotonic", lambda: clock[0])
    fanout, calls = events.Fanout(), []
    stalled, local = fanout.subscribe(overrun=lambda: calls.append("dropped")), fanout.subscribe()
    burst = events.Fanout.BACKLOG + 10  # e.g. cancelling a long queue: one Cancelled a job, all at once
    for n in range(burst):
        fanout.publish(events.Log(message=str(n)))
    assert calls == [] and stalled.qsize() == burst  # a burst is read in time by a client that reads
    clock[0] = events.Fanout.PATIENCE
    fanout.publish(events.Log(message="later"))
    assert calls == ["dropped"] and fanout.queues == [local]  # still that far behind: it stopped reading
    assert stalled.qsize() == burst  # nothing more was put there
    assert local.qsize() == burst + 1  # one in this process is never dropped
    reader = fanout.subscribe(overrun=lambda: calls.append("reader dropped"))
    for n in range(events.Fanout.BACKLOG + 1):
        fanout.publish(events.Log(message=str(n)))
    while reader.qsize() > 10:  # it reads: back under the backlog, its clock starts again
        reader.get_nowait()
    fanout.publish(events.Log(message="read"))
    clock[0] += events.Fanout.PATIENCE
    fanout.publish(events.Log(message="on time"))
    assert calls == ["dropped"] and reader.qsize() == 12
    fanout.unsubscribe(reader)
    flood = fanout.subscribe(overrun=lambda: calls.append("flooded"))
    for n in range(events.Fanout.HARD_BACKLOG + 1):
        fanout.publish(events.Log(message=str(n)))
    assert calls == ["dropped", "flooded"] and flood.qsize() == events.Fanout.HARD_BACKLOG  # at once, no waiting


def test_a_subscriber_that_reads_nothing_holds_a_bounded_number_of_previews():
    fanout = events.Fanout()
    stalled, reading = fanout.subscribe(), fanout.subscribe()
    preview = Preview(job=1, worker=0, image=0, width=1, height=1, rgb=b"\0\0\0")
    for _ in range(1000):
        fanout.publish(preview)
        reading.get_nowait()
    fanout.publish(events.Done(job=1, worker=0, paths=[]))
    assert stalled.qsize() == events.Fanout.PREVIEW_BACKLOG + 1  # previews dropped, the job's end kept
    assert isinstance(reading.get_nowait(), events.Done)
