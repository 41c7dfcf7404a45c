"""A1111 prompt editing ``[from:to:when]`` and alternation ``[a|b]``: parsing, errors, and the denoise loop."""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from backend.engine.conditioning import encode, encode_schedule
from backend.engine.extras import apply_extras
from backend.engine.generate import generate_image
from backend.engine.loader import PipelineCache
from backend.errors import RequestError
from backend.guidance_settings import GuidanceSettings
from backend.models import resolve_model
from backend.prompting import build_prompt, check_prompts
from backend.prompting.editing import schedule_prompts
from backend.request import GenerateRequest
from ckpt_helpers import tiny_refiner
from cli_helpers import dreamtty

CPU = torch.device("cpu")
MODELS = {"sd": "demo", "xl": "demo-xl"}


def _texts(text: str, steps: int) -> list[str]:
    return list(schedule_prompts(text, "", steps).prompt)


# -- parsing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,steps,expected",
    [
        ("a [fantasy:cyberpunk:3] landscape", 6, ["a fantasy landscape"] * 3 + ["a cyberpunk landscape"] * 3),
        # when without a point: a step number; step `when` is the last with `from`
        ("[a:b:0]", 4, ["b"] * 4),
        ("[a:b:1]", 4, ["a", "b", "b", "b"]),
        ("[a:b:4]", 4, ["a"] * 4),
        ("[a:b:99]", 4, ["a"] * 4),
        ("[a:b: 2 ]", 4, ["a", "a", "b", "b"]),
        # with a point: a fraction of the steps, rounded down
        ("[a:b:0.0]", 4, ["b"] * 4),
        ("[a:b:1.0]", 4, ["a"] * 4),
        ("[a:b:1.]", 3, ["a"] * 3),
        ("[a:b:0.5]", 5, ["a", "a", "b", "b", "b"]),
        ("[a:b:.75]", 4, ["a", "a", "a", "b"]),
        ("[a:b:0.57]", 100, ["a"] * 57 + ["b"] * 43),  # exact decimal: 0.57 * 100 is 56.99... in binary floats
        ("[a:b:0.5]", 1, ["b"]),
        ("x[to:2]", 4, ["x", "x", "xto", "xto"]),
        ("[from::2]y", 3, ["fromy", "fromy", "y"]),
        # alternation, and nesting both ways
        ("[a|b|c]", 7, ["a", "b", "c", "a", "b", "c", "a"]),
        ("[a|]", 3, ["a", "", "a"]),
        ("[a|b]", 1, ["a"]),
        ("[[a|b]:c:3]", 5, ["a", "b", "a", "c", "c"]),
        ("[a:[b|c]:2]", 5, ["a", "a", "b", "c", "b"]),  # the alternation counts every step
        ("[[a:b:1]:c:3]", 4, ["a", "b", "b", "c"]),
        # with weights, BREAK and newlines, which the encoder reads next
        ("([a:b:1]:1.3)", 2, ["(a:1.3)", "(b:1.3)"]),
        ("[(a:1.2):b:1]", 2, ["(a:1.2)", "b"]),
        ("a [b:c:1] BREAK d", 2, ["a b BREAK d", "a c BREAK d"]),
        ("[a:b:1]\n[c|d]", 2, ["a\nc", "b\nd"]),
        # not editing: text as before
        ("[sks] dog", 3, ["[sks] dog"] * 3),
        ("[style: anime]", 2, ["[style: anime]"] * 2),
        ("[a:b]", 2, ["[a:b]"] * 2),
        ("[a:b:\u0663]", 4, ["[a:b:\u0663]"] * 4),  # another script's digit is no step, as in A1111
        (r"\[a:b:1\] \[c|d\]", 2, [r"\[a:b:1\] \[c|d\]"] * 2),
        (r"[a\:b:1]", 2, ["", r"a\:b"]),  # an escaped colon is text: [to:when]
        ("(a|b:1)", 2, ["(a|b:1)"] * 2),  # ':' and '|' in parentheses are text
        ("black and white, band, ANDROID", 2, ["black and white, band, ANDROID"] * 2),
        ("", 3, [""] * 3),
    ],
)
def test_text_of_each_step(text, steps, expected):
    assert _texts(text, steps) == expected


def test_a1111_documented_example():
    """The example with 100 steps from A1111's feature list ("Prompt editing")."""
    text = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
            "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    texts = [" ".join(t.split()) for t in _texts(text, 100)]
    assert texts[0] == texts[24] == "fantasy landscape with a mountain and an oak in foreground shoddy"
    assert texts[25] == "fantasy landscape with a lake and an oak in foreground in background shoddy"
    assert texts[50] == "fantasy landscape with a lake and an oak in foreground in background masterful"
    assert texts[60] == "fantasy landscape with a lake and an oak in background masterful"
    assert texts[75] == texts[99] == "fantasy landscape with a lake and a christmas tree in background masterful"


def test_schedule_record():
    schedule = schedule_prompts("a [cat:dog:2]", "[blurry|noisy]", 4)
    assert schedule.record() == {
        "steps": 4,
        "prompt": [{"first_step": 1, "last_step": 2, "text": "a cat"},
                   {"first_step": 3, "last_step": 4, "text": "a dog"}],
        "negative_prompt": [{"first_step": s, "last_step": s, "text": t}
                            for s, t in enumerate(["blurry", "noisy"] * 2, start=1)],
    }
    assert schedule_prompts("a [cat:dog:0]", "", 3).record() == {
        "steps": 3, "prompt": [{"first_step": 1, "last_step": 3, "text": "a dog"}]}
    assert schedule_prompts("a [sks] cat", "blurry", 3).record() is None


# -- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,message",
    [
        ("a [b:c:-1]", "'[' at column 3: when '-1' is not allowed; use a step number (10) or a fraction"),
        ("[b:c:+2]", "when '+2' is not allowed"),
        ("[b:c:1.5]", "when '1.5' is not allowed"),
        ("[b:c:1.2.3]", "when '1.2.3' is not allowed"),
        ("[to:-3]", "when '-3' is not allowed"),
        ("[a:b:c:2]", "'[' at column 1 has 3 ':'; prompt editing is [from:to:when], [to:when] or [from::when]"),
        ("x [a|b:2]", "'[' at column 3 mixes '|' (alternation) and ':' (prompt editing)"),
        ("[a:b:2", "'[' at column 1 is never closed"),
        ("a:b:2]", "unmatched ']' at column 6"),
        ("[a:b:2)", "closed by ')'"),
        ("a cat AND a dog", "'AND' at column 7 (A1111 composable diffusion) is not supported; write 'and'"),
        ("([(a:95)|b]:1.1)", "at step 1, which reads '((a:95):1.1)': weight 104.5 at column 8 is out of range"),
        # the group is no [...] down-weight: 60 / 1.1 * 2 = 109.1 was said, a weight of no step
        ("([a:(b:60):2]:2)", "at step 3, which reads '((b:60):2)': weight 120 at column 8 is out of range"),
        ("(x:200)", "weight 200 at column 3 is out of range"),  # no editing: the text as typed
    ],
)
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_malformed_editing_is_a_one_line_error_naming_the_field(text, message, field):
    texts = {"prompt": "ok", "negative_prompt": "ok", field: text}
    with pytest.raises(RequestError) as err:
        schedule_prompts(texts["prompt"], texts["negative_prompt"], 4)
    assert err.value.field == field and message in err.value.message and "\n" not in str(err.value)


def test_errors_at_submission(user_folder):
    (user_folder("wildcards") / "late.txt").write_text("[a:b:-1]\n")
    resolved = lambda **f: GenerateRequest(model="demo", seed=1, **f).resolved("demo")  # noqa: E731
    check_prompts(resolved(prompt="a [cat:dog:0.5]", negative_prompt="[blurry|noisy]"))
    with pytest.raises(RequestError, match=r"^negative_prompt: 'AND' at column 3"):
        check_prompts(resolved(prompt="x", negative_prompt="a AND b"))
    with pytest.raises(RequestError, match=r"^prompt: after wildcards and styles: '\[' at column 1: when '-1'"):
        check_prompts(resolved(prompt="__late__"))
    # A weight that editing pushes out of range shows in the text of a step (the steps are known here).
    build_prompt(GenerateRequest(prompt="([a|(b:95)]:1.1)", seed=1))
    with pytest.raises(RequestError, match=r"^prompt: at step 2, which reads '\(\(b:95\):1.1\)': weight 104.5"):
        check_prompts(resolved(prompt="([a|(b:95)]:1.1)", steps=3))


def test_cli_refuses_a_bad_when_before_queueing(tmp_path, demo_dirs, capsys):
    r = dreamtty(capsys, "generate", "a [cat:dog:-1]", "--model", "demo", "--out", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("dreamtty: prompt: '[' at column 3: when '-1' is not allowed; "
                                "use a step number (10) or a fraction of the steps from 0.0 to 1.0 (0.5)")
    assert not list(tmp_path.rglob("*.png"))


def test_editing_from_arrays_wildcards_and_styles(user_folder):
    """Editing in the user's text and in what arrays, wildcards and styles add is resolved after them."""
    (user_folder("wildcards") / "pet.txt").write_text("[cat|dog]\n")
    (user_folder("styles") / "mine.json").write_text(json.dumps(
        [{"name": "Sketch", "prompt": "[sketch:photo:0.5] of {prompt}", "negative_prompt": "[blurry::0.5]"}]))
    request = GenerateRequest(prompt="a [[red, blue]] __pet__", negative_prompt="lowres", styles=["Sketch"], seed=1,
                              index=1)
    plan = build_prompt(request)
    assert plan.positive == "[sketch:photo:0.5] of a blue [cat|dog]"
    schedule = plan.schedule(4)
    assert schedule.prompt == ("sketch of a blue cat", "sketch of a blue dog", "photo of a blue cat",
                               "photo of a blue dog")
    assert schedule.negative_prompt == ("lowres, blurry", "lowres, blurry", "lowres, ", "lowres, ")


# -- the denoise loop --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipes(demo_dirs):
    """Our own pipelines (hooks, SAG's attention processors and the refiner change them)."""
    cache = PipelineCache(CPU)
    return {family: cache.get(resolve_model(name), torch.float32) for family, name in MODELS.items()} | {"cache": cache}


@contextmanager
def unet_calls(pipe):
    """Record (encoder_hidden_states, SDXL text_embeds) of every UNet call."""
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        pooled = added.get("text_embeds")
        calls.append((kwargs["encoder_hidden_states"].clone(), None if pooled is None else pooled.clone()))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def encoder_calls(pipe):
    """Count the forward calls of each text encoder."""
    candidates = (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
    encoders = [e for e in candidates if e is not None]
    counts = [0] * len(encoders)

    def counter(i: int):
        def hook(*_) -> None:
            counts[i] += 1
        return hook

    handles = [encoder.register_forward_hook(counter(i)) for i, encoder in enumerate(encoders)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _generate(pipes, family, prompt, negative="", **fields):
    """Pixels and prompt record of one image (4 Euler steps at 32x32 unless ``fields`` say otherwise)."""
    fields = {"model": MODELS[family], "steps": 4, "width": 32, "height": 32, "seed": 5, "sampler": "euler", **fields}
    request = GenerateRequest(prompt=prompt, negative_prompt=negative, **fields)
    request = apply_extras(pipes[family], request.resolved(MODELS[family]), pipes["cache"])
    image, record = generate_image(pipes[family], request)
    return np.asarray(image), record


def _rows(pipe, prompt, negative, *, order=("uncond", "cond")):
    """The embeddings (and SDXL pooled) one batched UNet call gets for these texts under plain CFG."""
    with torch.inference_mode():
        c = encode(pipe, prompt, negative, True)
    parts = {"uncond": (c.uncond, c.uncond_pooled), "cond": (c.cond, c.pooled)}
    embeds = torch.cat([parts[r][0] for r in order])
    pooled = None if c.pooled is None else torch.cat([parts[r][1] for r in order])
    return embeds, pooled


def _same(call, expected) -> bool:
    return torch.equal(call[0], expected[0]) and (expected[1] is None or torch.equal(call[1], expected[1]))


@pytest.mark.parametrize("family", ["sd", "xl"])
@pytest.mark.parametrize("sampler,calls_per_step", [("euler", [1, 1, 1, 1]), ("heun", [2, 2, 2, 1])])
def test_each_unet_call_gets_its_steps_texts(pipes, family, sampler, calls_per_step):
    pipe = pipes[family]
    with unet_calls(pipe) as calls, encoder_calls(pipe) as encodings:
        _, record = _generate(pipes, family, "a [cat:dog:2] [red|blue]", "[blurry|noisy]", sampler=sampler)
    texts = [("a cat red", "blurry"), ("a cat blue", "noisy"), ("a dog red", "blurry"), ("a dog blue", "noisy")]
    expected = [_rows(pipe, *texts[step]) for step, n in enumerate(calls_per_step) for _ in range(n)]
    assert len(calls) == len(expected)
    assert all(_same(call, want) for call, want in zip(calls, expected))
    assert not _same(calls[0], expected[-1])
    assert encodings == [6] * len(encodings)  # 4 prompts + 2 negatives, each once per encoder, not per step
    assert record["schedule"]["prompt"][2] == {"first_step": 3, "last_step": 3, "text": "a dog red"}


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_switch_at_0_or_after_the_last_step_equals_the_plain_prompt(pipes, family):
    cat, cat_record = _generate(pipes, family, "a photo of a cat", "blurry")
    dog, _ = _generate(pipes, family, "a photo of a dog", "noisy")
    assert np.abs(cat.astype(int) - dog).max() > 0 and cat_record["schedule"] is None
    assert np.array_equal(_generate(pipes, family, "a photo of a [cat:dog:0]", "[blurry:noisy:0.0]")[0], dog)
    for when in ("1.0", "4", "9"):
        late = _generate(pipes, family, f"a photo of a [cat:dog:{when}]", f"[blurry:noisy:{when}]")[0]
        assert np.array_equal(late, cat), when
    mid = _generate(pipes, family, "a photo of a [cat:dog:2]", "blurry")[0]
    assert not np.array_equal(mid, cat) and not np.array_equal(mid, dog)


def test_encode_schedule_encodes_each_distinct_text_once(pipes):
    pipe = pipes["sd"]
    schedule = schedule_prompts("(a:1.2) [cat|dog] [x:y:3]", "[blurry|noisy]", 6)
    with torch.inference_mode(), encoder_calls(pipe) as encodings:
        conds = encode_schedule(pipe, schedule, True)
    assert encodings == [6]  # 4 prompts, 2 negatives
    assert len(set(conds.per_step)) == 4  # distinct (prompt, negative) pairs share one object
    assert conds.at(0, 6) is conds.at(2, 6) and conds.at(0, 6) is not conds.at(1, 6)
    with torch.inference_mode():
        plain = encode_schedule(pipe, schedule_prompts("a cat", "blurry", 6), True)
        reference = encode(pipe, "a cat", "blurry", True)
    assert len(set(plain.per_step)) == 1 and torch.equal(plain.per_step[0].cond, reference.cond)


def test_perp_neg_uses_each_steps_texts(pipes):
    pipe, settings = pipes["sd"], GuidanceSettings(perp_neg=1.0)
    with unet_calls(pipe) as calls:
        _generate(pipes, "sd", "a [cat:dog:2]", "blurry", guidance=settings)
    with torch.inference_mode():
        empty = encode(pipe, "", "", False).cond
    for step, call in enumerate(calls):
        want = _rows(pipe, "a cat" if step < 2 else "a dog", "blurry", order=("cond", "uncond"))[0]
        assert torch.equal(call[0], torch.cat([empty, want]))  # rows: empty, cond, uncond
    plain = _generate(pipes, "sd", "a dog", "blurry", guidance=settings)[0]
    assert np.array_equal(_generate(pipes, "sd", "a [cat:dog:0]", "blurry", guidance=settings)[0], plain)


def test_sag_blurs_with_each_steps_negative(pipes):
    """SAG's second UNet call per step re-runs the base (uncond) branch: it follows the negative's schedule."""
    pipe = pipes["sd"]
    with unet_calls(pipe) as calls:
        _generate(pipes, "sd", "a cat", "[blurry:noisy:2]", guidance=GuidanceSettings(sag=0.5))
    assert len(calls) == 8
    for step in range(4):
        negative = "blurry" if step < 2 else "noisy"
        assert _same(calls[2 * step], _rows(pipe, "a cat", negative))
        with torch.inference_mode():
            assert torch.equal(calls[2 * step + 1][0], encode(pipe, "a cat", negative, True).uncond)


def test_refiner_gets_the_texts_of_the_steps_after_the_hand_over(pipes, tmp_path):
    tiny_refiner().save_pretrained(tmp_path / "refiner")
    # normal schedule, 4 steps: timesteps 751 501 251 1; the base runs those >= 500 (diffusers' denoising_end)
    pipe, fields = pipes["xl"], {"refiner": str(tmp_path / "refiner"), "refiner_switch": 0.5, "scheduler": "normal"}
    with unet_calls(pipe) as base_calls:
        _generate(pipes, "xl", "warmup", **fields)  # loads the refiner
        base_calls.clear()
        refiner = pipe.dreamtty.refiner
        with unet_calls(refiner) as refiner_calls:
            _, record = _generate(pipes, "xl", "a [castle:tower:3]", "blurry", **fields)
    assert all(_same(call, _rows(pipe, "a castle", "blurry")) for call in base_calls) and len(base_calls) == 2
    assert len(refiner_calls) == 2
    assert _same(refiner_calls[0], _rows(refiner, "a castle", "blurry"))
    assert _same(refiner_calls[1], _rows(refiner, "a tower", "blurry"))
    assert record["refiner"]["switch"] == 0.5
    tower = _generate(pipes, "xl", "a tower", "blurry", **fields)[0]
    assert np.array_equal(_generate(pipes, "xl", "a [castle:tower:0]", "blurry", **fields)[0], tower)


def test_brackets_nested_too_deep_are_a_one_line_error_not_a_recursion_error():
    with pytest.raises(RequestError, match="^negative_prompt: brackets nested deeper than 32 at column 33"):
        check_prompts(GenerateRequest(negative_prompt="[" * 400 + "a" + "]" * 400))
