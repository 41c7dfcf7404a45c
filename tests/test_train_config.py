"""Training without torch: TrainRequest validation, image checks, unique token, run dirs, events, CLI input."""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from backend.events import TrainCheckpoint, TrainLog, TrainResume, TrainState, TrainStep
from backend.errors import ModelError, RequestError
from backend.training import runs
from backend.training.config import TrainRequest, check_field, load_yaml
from backend.training.images import scan_images
from backend.training.launch import prepare_run, request_stop
from backend.training.words import unique_token_warning
from tui import cli


def _image(path, size=(80, 96), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _image(folder / f"dog{i}.png", seed=i)
    return folder


def _request(photos, **extra) -> TrainRequest:
    base = {"model": "demo", "instance_dir": str(photos), "instance_prompt": "a photo of sks dog"}
    return TrainRequest(**{**base, **extra})


# -- TrainRequest ----------------------------------------------------------------
@pytest.mark.parametrize("changes, field, words", [
    ({"resolution": 100}, "resolution", "not a multiple of 8"),
    ({"method": "dora"}, "method", "allowed: full, lora"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "allowed: no, fp16, bf16"),
    ({"rank": 0}, "rank", "out of range"),
    ({"lr": 5.0}, "lr", "out of range"),
    ({"prior_preservation": True}, "class_prompt",
     "required for prior preservation (or turn it off: --no-prior-preservation, or prior_preservation: false)"),
    ({"class_prompt": "a dog", "num_class_images": 0}, "num_class_images", "at least 1"),
    ({"instance_prompt": "  "}, "instance_prompt", "required"),
    ({"instance_prompt": "x" * 10_001}, "instance_prompt", "is 10,001 characters; allowed up to 10,000"),
    ({"validation_prompt": "x" * 100_000}, "validation_prompt", "is 100,000 characters; allowed up to 10,000"),
    ({"report_to": "wandb"}, "report_to", "allowed: none, tensorboard"),
    ({"seed": -5}, "seed", "out of range"),
    ({"lr_scheduler": "onecycle"}, "lr_scheduler", "allowed: constant, constant_with_warmup, linear, cosine"),
    ({"lr_warmup_steps": 400}, "lr_warmup_steps", "must be below max_steps (400)"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps", "out of range"),
])
def test_bad_settings_name_the_field(photos, changes, field, words):
    with pytest.raises(RequestError) as err:
        _request(photos, **changes).validate()
    assert err.value.field == field
    assert words in str(err.value) and "\n" not in str(err.value)


def test_an_app_config_given_to_train_says_where_it_goes():
    """``train --config app.yaml`` listed 34 training settings, with no word of the app's --config."""
    with pytest.raises(RequestError, match=r"^paths: unknown setting; allowed: .*validation_prompt; the app's settings "
                                           r"go in `dreamtty --config FILE train \.\.\.`$"):
        TrainRequest.from_dict({"paths": {"checkpoints": ["/models"]}})
    with pytest.raises(RequestError, match=r"^stpes: unknown setting; allowed: .*validation_prompt$"):
        TrainRequest.from_dict({"stpes": 3})


def test_from_dict_coerces_text_and_rejects_unknown_keys():
    req = TrainRequest.from_dict({"model": "demo", "max-steps": "12", "lr": "2e-4", "random_flip": "yes",
                                  "class_prompt": "", "snr_gamma": "none"})
    assert (req.max_steps, req.lr, req.random_flip, req.class_prompt, req.snr_gamma) == (12, 2e-4, True, None, None)
    with pytest.raises(RequestError, match="max_steps: '1.5' is not a whole number"):
        TrainRequest.from_dict({"max_steps": "1.5"})
    big = "99999999999999999999999"  # named as typed, not as a float rounds it
    with pytest.raises(RequestError, match=f"seed: {big} is out of range"):
        TrainRequest.from_dict({"model": "demo", "seed": big}).validate()
    with pytest.raises(RequestError, match="^max_steps: a number of 5000 digits is out of range$"):
        TrainRequest.from_dict({"max_steps": "9" * 5000})  # past what int() reads
    with pytest.raises(RequestError) as err:
        TrainRequest.from_dict({"epochs": 3})
    assert err.value.field == "epochs"


def test_from_dict_refuses_nul_in_paths_and_text_that_is_not_utf8():
    assert TrainRequest.from_dict({"instance_prompt": "a sks\0toy"}).instance_prompt == "a sks\0toy"  # free text
    with pytest.raises(RequestError, match=r"^instance_dir: holds a NUL character \(at character 7\)"):
        TrainRequest.from_dict({"instance_dir": "/tmp/a\0b"})
    with pytest.raises(RequestError, match=r"^class_prompt: is not valid UTF-8 text \(byte 0xff at character 3\)"):
        TrainRequest.from_dict({"class-prompt": "a \udcff dog"})


def test_resolved_fills_family_defaults(photos):
    req = _request(photos, class_prompt="a photo of dog", method="full").resolved("demo")
    assert (req.resolution, req.lr, req.prior_preservation) == (128, 5e-6, True)
    assert 0 <= req.seed <= 2**32 - 1
    assert _request(photos, class_prompt="x", prior_preservation=False).resolved("sdxl").resolution == 1024
    with pytest.raises(RequestError, match="too large"):
        _request(photos, resolution=4096).resolved("sd1")
    assert req.lr_scheduler == "constant"  # a warmup on the constant schedule warms up
    assert _request(photos, lr_warmup_steps=10).resolved("sd1").lr_scheduler == "constant_with_warmup"
    assert _request(photos, lr_scheduler="cosine", lr_warmup_steps=10).resolved("sd1").lr_scheduler == "cosine"


def test_yaml_config(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: demo\nmax-steps: 7\nrandom_flip: true\n")
    assert load_yaml(path) == {"model": "demo", "max_steps": 7, "random_flip": True}
    path.write_text("model: [unclosed\n")
    with pytest.raises(RequestError, match="config: .* is not valid YAML at line"):
        load_yaml(path)
    path.write_text("model: demo\nmax_steps: 5\nmax_steps: 6\n")
    with pytest.raises(RequestError, match=r"^config: .* is not valid YAML at line 3 \(the key 'max_steps' is given twice\)$"):
        load_yaml(path)
    path.write_text("model: demo\nmax_steps: 5\nmax-steps: 6\n")
    with pytest.raises(RequestError, match=r"^max_steps: is given twice in .*train.yaml \(as max_steps and max-steps\)$"):
        load_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(RequestError, match="mapping"):
        load_yaml(path)


@pytest.mark.parametrize("word", ["no", "off", "false", '"no"'])
def test_mixed_precision_no_in_yaml_is_no_though_yaml_reads_it_as_false(tmp_path, word):
    path = tmp_path / "train.yaml"
    path.write_text(f"mixed_precision: {word}\n")
    assert TrainRequest.from_dict(load_yaml(path)).mixed_precision == "no"
    path.write_text("mixed_precision: yes\n")
    with pytest.raises(RequestError, match="^mixed_precision: must be text, got true$"):
        TrainRequest.from_dict(load_yaml(path))
    with pytest.raises(RequestError, match="^seed: must be a whole number, got true$"):  # not Python's "True"
        TrainRequest.from_dict({"seed": True})


# -- instance images and the unique token -----------------------------------------
def test_scan_skips_bad_files_with_a_warning_each(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _image(folder / "good.png")
    (folder / "notes.txt").write_text("hello")
    _image(folder / "tiny.png", size=(20, 20))
    good = folder / "good.png"
    (folder / "broken.jpg").write_bytes(good.read_bytes()[:200])
    (folder / ".hidden.png").write_bytes(b"x")
    scan = scan_images(folder, 128)
    assert scan.files == [good]
    text = "\n".join(scan.warnings)
    assert "notes.txt: not an image" in text
    assert "tiny.png: too small (20x20" in text
    assert "broken.jpg: corrupt image" in text
    assert ".hidden" not in text


def test_scan_errors(tmp_path):
    with pytest.raises(RequestError, match="instance_dir: .* does not exist"):
        scan_images(tmp_path / "missing", 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RequestError, match="is empty"):
        scan_images(tmp_path / "empty", 64)
    (tmp_path / "empty" / "photos").mkdir()  # it said "is empty"
    with pytest.raises(RequestError, match="empty holds only folders, which are not read; put 3-20 photos"):
        scan_images(tmp_path / "empty", 64)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("no")
    with pytest.raises(RequestError, match=r"no usable images \(a.txt: not an image\)"):
        scan_images(tmp_path / "junk", 64)


def test_unique_token_warning():
    assert unique_token_warning("a photo of sks dog", "a photo of dog") is None
    assert "'dog' is a common English word" in unique_token_warning("a photo of dog")
    assert "'red' is a common English word" in unique_token_warning("a photo of red dog", "a photo of dog")
    assert "no unique token" in unique_token_warning("a photo of dog", "a photo of dog")
    assert unique_token_warning("ohwx man") is None


PRIOR_OFF = ("unused with prior preservation off (turn it on: --prior-preservation, or prior_preservation: true); "
             "ignored")


@pytest.mark.parametrize("changes, said", [
    ({"method": "full", "rank": 8}, ["rank: the LoRA rank, unused by a full fine-tune (--method full); ignored"]),
    ({"class_prompt": "a dog", "prior_preservation": False, "prior_loss_weight": 0.5},
     [f"{name}: {PRIOR_OFF}" for name in ("class_prompt", "prior_loss_weight")]),
    ({"num_class_images": 20}, [f"num_class_images: {PRIOR_OFF}"]),
    ({"method": "full", "class_prompt": "a dog", "num_class_images": 20}, []),  # all used; rank left as is
    ({"class_prompt": "", "prior_preservation": False}, []),
    ({"batch_size": 4}, ["batch_size: 4 is more than the 3 usable instance images; each step shows some of them more "
                         "than once"]),
    ({"batch_size": 3}, []),
])
def test_settings_a_run_does_not_use_are_warned_about(photos, tmp_path, changes, said):
    prepared = prepare_run(_request(photos, output=str(tmp_path / "run"), **changes))
    assert [w for w in prepared.warnings if "common English word" not in w] == said


# -- run dirs ------------------------------------------------------------------------
def test_prepare_run_writes_run_json_and_links(photos, tmp_path):
    prepared = prepare_run(_request(photos, instance_prompt="a photo of dog", output=str(tmp_path / "run1"), seed=3))
    data = runs.read_run_json(prepared.run_dir)
    assert data["state"] == "starting" and data["settings"]["seed"] == 3 and data["family"] == "demo"
    assert data["settings"]["resolution"] == 128
    assert any("common English word" in w for w in prepared.warnings)
    events = runs.EventTail(prepared.run_dir).read()
    assert isinstance(events[0], TrainLog) and events[0].level == "warning"
    linked = [r.path for r in runs.list_runs()]
    assert prepared.run_dir in linked  # a symlink in the runs folder points at it
    (tmp_path / "file").write_text("")  # a runs folder that cannot be made (as one that is read-only)
    elsewhere = prepare_run(_request(photos, output=str(tmp_path / "run2")), runs_root=tmp_path / "file" / "runs")
    assert runs.read_run_json(elsewhere.run_dir)["state"] == "starting"  # the run goes on, unlisted
    assert elsewhere.warnings[-1] == (
        f"runs: cannot list the run in {tmp_path / 'file' / 'runs'} (Not a directory); the Train screen does not "
        f"show it, `dreamtty train --output {tmp_path / 'run2'} --resume latest` still works")
    # A second start into the same folder needs --resume.
    runs.update_run_json(prepared.run_dir, state="done")
    with pytest.raises(RequestError, match=r"output: .* already holds a run; resume with --resume latest \(ctrl\+r "):
        prepare_run(_request(photos, output=str(tmp_path / "run1")))
    with pytest.raises(RequestError, match="resume: .* finished without a checkpoint to continue from"):
        prepare_run(_request(photos, output=str(tmp_path / "run1"), resume="latest"))  # would overwrite its result
    runs.update_run_json(prepared.run_dir, state="failed")  # failed before its first checkpoint: start over
    warned = prepare_run(_request(photos, output=str(tmp_path / "run1"), resume="latest"))
    assert any("no checkpoint yet" in w for w in warned.warnings)
    with pytest.raises(RequestError, match="is already running"):  # "starting", no trainer yet
        prepare_run(_request(photos, output=str(tmp_path / "run1"), resume="latest"))
    runs.update_run_json(prepared.run_dir, state="stopped")
    typo = tmp_path / "rnu1"  # a typo, or the first launch of a script that always resumes: a new run, said so
    assert prepare_run(_request(photos, output=str(typo), resume="latest")).warnings == [
        f"resume: {typo} holds no run yet; a new run starts there from step 0 (check its name if you meant to "
        "continue one)"]
    for resume in ("nope", "r" * 300, f"/tmp/{'r' * 300}"):  # a name too long is not blamed on the output
        with pytest.raises(RequestError, match=f"^resume: {resume} is not a checkpoint folder"):
            prepare_run(_request(photos, output=str(tmp_path / "run1"), resume=resume))


def test_a_relative_model_path_is_recorded_absolute_for_the_trainer_in_the_run_folder(photos, tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    for name in ("model_index.json", "dreamtty_demo.json"):  # a demo model's folder, as far as its family goes
        (tmp_path / "base" / name).write_text('{"family": "demo"}')
    monkeypatch.chdir(tmp_path)
    prepared = prepare_run(_request(photos, model="base", output="run"))
    assert runs.read_run_json(prepared.run_dir)["settings"]["model"] == str(tmp_path / "base")
    assert runs.read_run_json(prepare_run(_request(photos, output="demo-run")).run_dir)["settings"]["model"] == "demo"


def test_prepare_run_checks_model_and_optional_packages(photos, monkeypatch):
    with pytest.raises(ModelError, match="does not exist"):
        prepare_run(_request(photos, model="/no/such/model"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(RequestError, match="use_8bit_adam: needs bitsandbytes"):
        prepare_run(_request(photos, use_8bit_adam=True))


def test_dead_trainer_reads_as_failed_and_stop_file(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": "running", "pid": proc.pid, "settings": {}})
    state, error = runs.effective_state(run_dir)
    assert state == "failed" and "--resume latest" in error
    assert not runs.pid_alive(os.getpid(), run_dir)  # pytest is not a trainer process
    request_stop(run_dir)
    assert (run_dir / runs.STOP_FILE).exists()


def test_event_tail_is_incremental_and_waits_for_whole_lines(tmp_path):
    write = runs.EventWriter(tmp_path)
    tail = runs.EventTail(tmp_path)
    assert tail.read() == []
    write(TrainStep(step=1, max_steps=9, loss=0.5))
    with open(tmp_path / runs.EVENTS, "a") as fh:  # a line as runs wrote them before events had versions
        fh.write('{"type": "step", "step": 2, "max_steps": 9, "lo')
    assert [e.step for e in tail.read()] == [1]
    with open(tmp_path / runs.EVENTS, "a") as fh:
        fh.write('ss": 0.4}\nnot json\n')
    assert [e.step for e in tail.read()] == [2]
    assert tail.read() == []


def test_progress_resume_replaces_superseded_steps():
    progress = runs.RunProgress()
    for step, loss in [(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)]:
        progress.apply(TrainStep(step=step, max_steps=10, loss=loss, lr=1e-4, its=2.0))
    assert progress.apply(TrainResume(step=2, checkpoint="c")) == "resumed from step 2 (c)"
    progress.apply(TrainStep(step=3, max_steps=10, loss=0.5, lr=1e-4, its=2.0))
    assert progress.losses == {1: 1.0, 2: 0.9, 3: 0.5}
    assert progress.summary() == "step 3/10  loss 0.5000  lr 1.00e-04  2.00 it/s  ETA 0:04"
    assert runs.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])


def test_a_runs_progress_knows_its_planned_steps_before_its_trainer_says_them(tmp_path):
    """A run waiting for its device read "step 0/?"."""
    runs.write_json_atomic(tmp_path / runs.RUN_JSON, {"settings": {"max_steps": 400}})
    assert runs.RunProgress.of_run(tmp_path).summary() == "step 0/400"
    runs.write_json_atomic(tmp_path / runs.RUN_JSON, {"settings": {"max_steps": "x"}})  # damaged: as unknown
    assert runs.RunProgress.of_run(tmp_path).summary() == "step 0/?"


def test_run_output_detects_results(tmp_path):
    assert runs.run_output(tmp_path) is None
    (tmp_path / "lora").mkdir()
    (tmp_path / runs.LORA_FILE).write_bytes(b"x")
    assert runs.run_output(tmp_path) == ("lora", tmp_path / runs.LORA_FILE)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    assert runs.run_output(tmp_path) == ("model", tmp_path / "model")


# -- CLI -------------------------------------------------------------------------------
def _args(*argv):
    parser = cli.build_parser()
    return parser.parse_args(["train", *argv])


def test_cli_precedence_defaults_config_flags(tmp_path, photos):
    from tui.cli_train import request_from_args

    config = tmp_path / "train.yaml"
    config.write_text(f"model: demo\ninstance_dir: {photos}\ninstance_prompt: a photo of sks dog\n"
                      "max_steps: 50\nrank: 8\nrandom_flip: true\n")
    req = request_from_args(_args("--config", str(config), "--rank", "16", "--no-random-flip", "--class-prompt",
                                  "a photo of dog", "--no-prior-preservation"))
    assert (req.max_steps, req.rank, req.random_flip, req.prior) == (50, 16, False, False)
    # --resume takes the run's own settings, then the flags.
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    runs.write_json_atomic(run_dir / runs.RUN_JSON, {"settings": req.to_dict() | {"seed": 9}})
    resumed = request_from_args(_args("--output", str(run_dir), "--resume", "latest", "--max-steps", "80"))
    assert (resumed.seed, resumed.rank, resumed.max_steps, resumed.resume) == (9, 16, 80, "latest")
    config.write_text(config.read_text() + "validation_prompt: a sks dog on the moon\n")
    cleared = request_from_args(_args("--config", str(config), "--validation-prompt", ""))
    assert cleared.validation_prompt is None  # an empty text flag clears the file's (other empties are refused)


@pytest.mark.parametrize("argv, words", [
    (["--resolution", "100"], "resolution: 100 is not a multiple of 8"),
    (["--rank", "many"], "rank: 'many' is not a whole number"),
    (["--method", "dora"], "method: unknown 'dora'"),
    (["--lr-warmup-steps", "soon"], "lr_warmup_steps: 'soon' is not a whole number"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, photos, argv, words):
    code = cli.main(["train", "--model", "demo", "--instance-dir", str(photos), "--instance-prompt", "sks dog", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert words in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag", ["--lr", "--snr-gamma", "--rank", "--launcher", "--config"])
def test_an_empty_flag_is_refused_not_read_as_the_default(capsys, flag):
    """``--lr "$LR"`` with LR unset trained at the default rate (--rank "" said "is required", unlike the rest)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", "demo", flag, ""])
    assert exit_.value.code == 2 and capsys.readouterr().err.endswith(
        f"error: argument {flag}: is empty; give a value or leave the option out\n")


@pytest.mark.parametrize("text", ["[]", "null", '"a run"', "garbage{",
                                  '{"state": "running", "pid": "7", "created": "x", "updated": [], "settings": [1]}'])
def test_a_damaged_run_json_is_named_and_listed_without_a_traceback(capsys, tmp_path, text):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / runs.RUN_JSON).write_text(text)
    for demo in ([], ["--demo"]):  # a model given (--demo) said "instance_dir: is required"
        assert cli.main([*demo, "train", "--output", str(run_dir), "--resume", "latest"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"dreamtty: resume: {run_dir / runs.RUN_JSON} holds no settings to resume with (it is " \
                      "damaged); give --model, --instance-dir and --instance-prompt too"
    [listed] = runs.list_runs(tmp_path / "runs")  # the Train screen's list: it was left out, checkpoints and all
    assert (listed.name, listed.settings, listed.state) == ("r", {}, "failed")
    if not text.startswith("{"):
        assert listed.error == (f"run.json is damaged (not a JSON object with the run's settings); its checkpoints "
                                f"are in {run_dir / runs.CHECKPOINTS}")
        assert listed.updated == (run_dir / runs.RUN_JSON).stat().st_mtime


def test_a_resolution_out_of_range_says_what_0_means():
    with pytest.raises(RequestError) as err:
        check_field("resolution", "-8")
    assert str(err.value) == "resolution: -8 is out of range; allowed 0..4096 (0: the model's size)"


def test_two_runs_in_folders_of_the_same_name_are_listed_apart_by_their_links(tmp_path):
    """Both were listed "run1" on the Train screen (their links in the runs folder are run1 and run1-1)."""
    root = tmp_path / "runs"
    for n, parent in enumerate(("a", "b")):
        run_dir = tmp_path / parent / "run1"
        run_dir.mkdir(parents=True)
        runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": "done", "settings": {}, "updated": float(n)})
        runs.link_into_root(run_dir, root)
    assert [(r.name, r.path) for r in runs.list_runs(root)] == [("run1-1", tmp_path / "b" / "run1"),
                                                                 ("run1", tmp_path / "a" / "run1")]


def test_a_resume_of_no_run_names_resume_or_output_not_the_missing_model(capsys, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    runs.write_json_atomic(done / runs.RUN_JSON, {"state": "done", "settings": {}})
    no_json = tmp_path / "no-json"
    (no_json / runs.CHECKPOINTS).mkdir(parents=True)
    cases = [
        ([], "resume: needs the run to continue: --output RUN_DIR (output: RUN_DIR)"),
        *((["--output", str(tmp_path / "none"), *demo], f"resume: {tmp_path / 'none'} holds no run to continue; give "
                                                         "--output the folder of a run, or --model, --instance-dir and "
                                                         "--instance-prompt to start one there")
          for demo in ([], ["--demo"])),  # a model given (--demo) said "instance_dir: is required"
        (["--output", str(no_json)], f"output: {no_json} is not empty and holds no run; choose a new or empty folder"),
        (["--output", str(done), "--resume", ""], f"output: {done} already holds a run; {runs.RESUME_HINT}, or choose "
                                                  "another folder"),
    ]
    for argv, error in cases:
        assert cli.main(["train", "--resume", "latest", *argv, "--max-steps", "8"]) == 2, argv
        assert capsys.readouterr().err == f"dreamtty: {error}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "done", "no-json"]  # no folder made


def test_fp16_for_a_full_fine_tune_on_the_cpu_is_refused_before_a_run_folder_is_made(capsys, photos, tmp_path):
    argv = ["--device", "cpu", "train", "--model", "demo", "--instance-dir", str(photos), "--instance-prompt",
            "sks dog", "--method", "full", "--mixed-precision", "fp16", "--output", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == ("dreamtty: mixed_precision: fp16 needs a CUDA GPU for a full fine-tune; use "
                                       "bf16 or no on the CPU\n")
    assert not (tmp_path / "run").exists()


def test_cli_missing_instance_dir(capsys, tmp_path):
    code = cli.main(["train", "--model", "demo", "--instance-dir", str(tmp_path / "none"), "--instance-prompt", "sks"])
    assert code == 2 and "instance_dir:" in capsys.readouterr().err


def test_trainer_entry_without_run_json_fails_cleanly(tmp_path, capsys):
    from backend.training.trainer_process import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "has no run.json" in capsys.readouterr().err
    assert main([]) == 2


class FakeTrainer:
    """Stands in for the trainer process: writes a short run, then exits with ``final`` in run.json."""

    pid, returncode = 4321, 0

    def __init__(self, run_dir, final: dict) -> None:
        self.run_dir, self.final, self.polls = run_dir, final, 0

    def poll(self):
        self.polls += 1
        if self.polls == 1:
            write = runs.EventWriter(self.run_dir)
            write(TrainState(state="running", max_steps=2))
            write(TrainStep(step=1, max_steps=2, loss=0.5, lr=1e-4, its=2.0))
            write(TrainStep(step=2, max_steps=2, loss=0.25, lr=1e-4, its=2.0))
            write(TrainCheckpoint(step=2, path="ckpt-2"))
            return None
        runs.update_run_json(self.run_dir, **self.final)
        return 0


@pytest.mark.parametrize("final, code, words", [
    ({"state": "done", "output": {"kind": "lora", "path": "/runs/x/lora.safetensors"}}, 0, None),
    ({"state": "stopped", "step": 2}, 1, "stopped at step 2; continue with dreamtty train --output"),
    ({"state": "failed", "error": "use_8bit_adam: needs a CUDA GPU", "error_kind": "input"}, 2,
     "training failed: use_8bit_adam: needs a CUDA GPU"),
    ({"state": "failed", "error": "out of GPU memory at step 2", "error_kind": "error"}, 1, "training failed: out of"),
])
def test_cli_foreground_follows_events_and_exits_by_outcome(tmp_path, capsys, monkeypatch, final, code, words):
    from tui.cli_train import follow

    monkeypatch.setattr("tui.cli_train.time.sleep", lambda _: None)
    runs.write_json_atomic(tmp_path / runs.RUN_JSON, {"state": "running", "settings": {}})
    runs.EventWriter(tmp_path)(TrainLog(level="warning", message="printed before, by prepare"))
    assert follow(tmp_path, FakeTrainer(tmp_path, final)) == code
    out, err = capsys.readouterr()
    assert "printed before" not in err
    assert "dreamtty: step 2/2  loss 0.2500  lr 1.00e-04  2.00 it/s" in err
    assert "dreamtty: checkpoint saved at step 2: ckpt-2" in err
    if words is None:
        assert out.strip() == "/runs/x/lora.safetensors"
    else:
        assert words in err.splitlines()[-1] and out == ""


def test_output_folder_that_is_not_a_run_is_refused_and_left_alone(photos, tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("precious")
    with pytest.raises(RequestError, match=r"^output: .*afile.txt is a file; give a folder"):
        prepare_run(_request(photos, output=str(afile)))
    with pytest.raises(RequestError, match=r"^output: cannot write the run to .*afile.txt/sub: Not a directory$"):
        prepare_run(_request(photos, output=str(afile / "sub")))
    other = tmp_path / "other"
    (other / "model").mkdir(parents=True)
    (other / "model" / "notes.txt").write_text("precious")
    for folder in (other, photos):  # someone's files, or the instance photos themselves
        with pytest.raises(RequestError, match=r"^output: .* is not empty and holds no run; choose a new or empty"):
            prepare_run(_request(photos, output=str(folder)))
    assert (other / "model" / "notes.txt").read_text() == "precious" and afile.read_text() == "precious"
    assert not (photos / runs.RUN_JSON).exists()
    with pytest.raises(RequestError, match=r"^resume: needs the run to continue: --output RUN_DIR \(output: RUN_DIR"):
        prepare_run(_request(photos, resume="latest"))


def _finished_run(photos, tmp_path, checkpoint_step: int, **settings):
    """A finished LoRA run in tmp_path/run with one checkpoint, as the trainer leaves it."""
    run_dir = prepare_run(_request(photos, output=str(tmp_path / "run"), max_steps=checkpoint_step, **settings)).run_dir
    runs.update_run_json(run_dir, state="done")
    checkpoint = run_dir / runs.CHECKPOINTS / f"{runs.CHECKPOINT_PREFIX}{checkpoint_step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "dreamtty_state.json").write_text(f'{{"step": {checkpoint_step}}}')
    return run_dir


@pytest.mark.parametrize("changes, message", [
    ({"max_steps": 4}, r"^max_steps: 4 must be above the checkpoint's step 4 to train on"),
    ({"max_steps": 8, "method": "full"}, r"^method: the checkpoint was trained with lora, not full; a resume must"),
    ({"max_steps": 8, "rank": 8}, r"^rank: the checkpoint was trained with 4, not 8"),
    ({"max_steps": 8, "train_text_encoder": True}, r"^train_text_encoder: the checkpoint was trained with False"),
])
def test_resume_that_would_lose_or_break_the_run_is_refused_before_run_json_changes(photos, tmp_path, changes,
                                                                                    message):
    run_dir = _finished_run(photos, tmp_path, 4)
    before = (run_dir / runs.RUN_JSON).read_text()
    with pytest.raises(RequestError, match=message):
        prepare_run(_request(photos, output=str(run_dir), resume="latest", **changes))
    assert (run_dir / runs.RUN_JSON).read_text() == before
    extended = prepare_run(_request(photos, output=str(run_dir), resume="latest", max_steps=8))
    assert extended.request.max_steps == 8 and extended.warnings == []


def test_a_checkpoint_of_another_run_is_refused_before_anything_moves(photos, tmp_path, capsys):
    other = _finished_run(photos, tmp_path / "a", 2, instance_prompt="a photo of zzq cat")
    ours = _finished_run(photos, tmp_path / "b", 4)
    before = sorted(str(p.relative_to(ours)) for p in ours.rglob("*")), (ours / runs.RUN_JSON).read_text()
    foreign = other / "checkpoints/checkpoint-2"
    copy = tmp_path / "backup" / "checkpoint-2"  # in no run folder
    shutil.copytree(foreign, copy)
    for checkpoint, whose in [(foreign, f"a checkpoint of {other}, not of {ours}"),
                              (copy, f"not a checkpoint of {ours}")]:
        assert cli.main(["train", "--output", str(ours), "--resume", str(checkpoint), "--max-steps", "8"]) == 2
        assert capsys.readouterr().err == (f"dreamtty: resume: {checkpoint} is {whose}; give one in "
                                           f"{ours / runs.CHECKPOINTS}, or latest\n")
    assert (sorted(str(p.relative_to(ours)) for p in ours.rglob("*")), (ours / runs.RUN_JSON).read_text()) == before


def test_a_trainer_that_cannot_start_leaves_a_failed_run_not_a_starting_one(photos, tmp_path, capsys):
    base = ["train", "--model", "demo", "--instance-dir", str(photos), "--instance-prompt", "a photo of sks dog"]
    unsplit = tmp_path / "unsplit"  # a launcher that cannot be split is refused before the run is made
    assert cli.main([*base, "--output", str(unsplit), "--launcher", "accelerate launch '"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dreamtty: launcher: \"accelerate launch '\": No closing quotation" and not unsplit.exists()
    missing = tmp_path / "missing"  # nor is one that names no program (its run, failed, was in the way of the next)
    assert cli.main([*base, "--output", str(missing), "--launcher", "no-such-launcher-cmd --x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dreamtty: launcher: 'no-such-launcher-cmd': no such program; give a command line such as "
                   "'accelerate launch --num_processes 2'") and not missing.exists()
    unrunnable = tmp_path / "unrunnable"
    unrunnable.write_bytes(b"\x00\x01")  # executable, but no program the system can run
    unrunnable.chmod(0o755)
    run_dir = tmp_path / "run"
    assert cli.main([*base, "--output", str(run_dir), "--launcher", str(unrunnable)]) == 2
    err = capsys.readouterr().err.strip()
    assert "launcher: cannot start the trainer" in err and len(err.splitlines()) == 1
    state, error = runs.effective_state(run_dir)
    assert state == "failed" and "launcher: cannot start the trainer" in error
    # Started again with a working trainer, it is a resume of that failed run (nothing to lose).
    assert prepare_run(_request(photos, output=str(run_dir), resume="latest")).warnings == [
        f"resume: {run_dir} has no checkpoint yet; starting from step 0"]


def test_train_config_file_is_not_the_apps_config_file(tmp_path, photos):
    from backend import config

    app_config = tmp_path / "app.yaml"
    app_config.write_text("default_model: demo\n")
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(f"instance_dir: {photos}\ninstance_prompt: a photo of sks dog\nmax_steps: 7\n")
    args = cli.build_parser().parse_args(["--config", str(app_config), "train", "--config", str(train_yaml)])
    assert (args.config, args.train_config) == (app_config, train_yaml)
    from tui.cli_train import request_from_args

    assert request_from_args(args).max_steps == 7
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(RequestError, match=r"^config: .*bin.yaml is not UTF-8 text"):
        load_yaml(bad)
    config.set_config_path(bad)
    try:
        assert config.load().warnings == [f"config: {bad} is not UTF-8 text; using defaults"]
    finally:
        config.set_config_path(None)


def test_cli_second_ctrl_c_leaves_the_trainer_running_and_a_dead_trainer_is_recorded(tmp_path, capsys, monkeypatch):
    from tui.cli_train import follow

    class Interrupted:
        """Ctrl-C twice while the trainer runs; ``stops``: it honoured the first one before the second came."""
        pid, returncode = 99, None

        def __init__(self, stops: bool) -> None:
            self.stops, self.polls = stops, 0

        def poll(self):
            self.polls += 1
            if self.polls <= 2:
                raise KeyboardInterrupt
            if self.stops:
                runs.update_run_json(tmp_path, state="stopped", step=4)
                self.returncode = 0
            return self.returncode

    monkeypatch.setattr("tui.cli_train.time.sleep", lambda _: None)
    runs.write_json_atomic(tmp_path / runs.RUN_JSON, {"state": "running", "settings": {}})
    assert follow(tmp_path, Interrupted(stops=False)) == 130
    assert not (tmp_path / runs.STOP_FILE).exists()  # the first Ctrl-C's stop request is taken back
    assert "leaving the trainer running in the background (pid 99)" in capsys.readouterr().err
    assert follow(tmp_path, Interrupted(stops=True)) == 1
    err = capsys.readouterr().err
    assert "leaving the trainer running" not in err and "dreamtty: stopped at step 4; continue with" in err
    runs.write_json_atomic(tmp_path / runs.RUN_JSON, {"state": "running", "settings": {}})
    assert follow(tmp_path, TookTheStop(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "leaving the trainer" not in err and err.endswith(
        "dreamtty: the trainer is stopping already, after its checkpoint (Ctrl-C again to stop waiting)\n"
        f"dreamtty: stopped at step 9; continue with dreamtty train --output {tmp_path} --resume latest\n")
    runs.write_json_atomic(tmp_path / runs.RUN_JSON, {"state": "running", "settings": {}})

    class DiedAtOnce:
        pid, returncode = 98, 3

        def poll(self):
            return 3

    assert follow(tmp_path, DiedAtOnce()) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dreamtty: training failed: the trainer exited with code 3 before finishing; see "
                   f"{tmp_path / runs.LOG_FILE}"]
    assert runs.read_run_json(tmp_path)["state"] == "failed"
    assert (tmp_path / runs.LOG_FILE).read_text() == "dreamtty: the trainer exited with code 3 before finishing\n"
    # A run recorded as failed without a reason still says where to look.
    runs.write_json_atomic(tmp_path / runs.RUN_JSON, {"state": "failed", "settings": {}})
    assert follow(tmp_path, DiedAtOnce()) == 1
    assert capsys.readouterr().err.strip() == f"dreamtty: training failed: see {tmp_path / runs.LOG_FILE}"
    # A full disk: the failure cannot be recorded, and is said all the same.
    runs.write_json_atomic(tmp_path / runs.RUN_JSON, {"state": "running", "settings": {}})
    with monkeypatch.context() as patch:
        patch.setattr(runs, "write_json_atomic", _raise(OSError(errno.ENOSPC, "No space left on device")))
        assert follow(tmp_path, DiedAtOnce()) == 1
    assert capsys.readouterr().err.strip() == (
        f"dreamtty: training failed: the trainer exited with code 3 before finishing, and nothing can be written in "
        f"{tmp_path} (No space left on device): free some space, then resume with --resume latest (ctrl+r on the "
        "Train screen)")
    assert runs.read_run_json(tmp_path)["state"] == "running"  # as it was
    # A read-only folder is not cured by freeing space.
    with monkeypatch.context() as patch:
        patch.setattr(runs, "write_json_atomic", _raise(OSError(errno.EROFS, "Read-only file system")))
        assert follow(tmp_path, DiedAtOnce()) == 1
    assert capsys.readouterr().err.strip().endswith("(Read-only file system): make it writable, then resume with "
                                                    "--resume latest (ctrl+r on the Train screen)")


class TookTheStop:
    """A trainer that takes the first Ctrl-C's stop request (it removes STOP) before the second Ctrl-C comes,
    then saves its checkpoint and stops."""

    pid, returncode = 97, None

    def __init__(self, run_dir) -> None:
        self.run_dir, self.polls = run_dir, 0

    def poll(self):
        self.polls += 1
        if self.polls == 2:
            (self.run_dir / runs.STOP_FILE).unlink()
        if self.polls <= 2:
            raise KeyboardInterrupt
        if self.polls < 5:
            return None  # saving its checkpoint
        runs.update_run_json(self.run_dir, state="stopped", step=9)
        self.returncode = 3
        return 3


@pytest.mark.timeout(5)  # the old walk of every path took minutes
def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """A "billion laughs" file (aliases of aliases, 9**9 texts if walked) is checked node by node."""
    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "train.yaml"
    path.write_text("model: demo\ninstance_prompt: {" + ", ".join(levels) + "}\n")
    with pytest.raises(RequestError, match=r"^instance_prompt: must be text, got a mapping$"):
        TrainRequest.from_dict(load_yaml(path))
    nested = load_yaml(path)["instance_prompt"]["i"]
    nested[0][0][0][0][0][0][0][0][0] = "\0"
    with pytest.raises(RequestError, match=r"^instance_dir: holds a NUL character"):
        TrainRequest.from_dict({"instance_dir": nested})


def _raise(exc: Exception):
    def raising(*args, **kwargs):
        raise exc
    return raising


def test_a_run_folder_of_the_wrong_kind_for_model_or_lora_says_what_it_is_and_which_flag_takes_it(tmp_path):
    from backend.config import Config
    from backend.extras_check import find_extra
    from backend.models import resolve_model

    full, lora, stopped = (tmp_path / name for name in ("full", "lora", "stopped"))
    for run_dir, state in ((full, "done"), (lora, "done"), (stopped, "stopped")):
        run_dir.mkdir()
        runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": state, "step": 6, "settings": {}})
    (full / runs.MODEL_DIR).mkdir()
    (full / runs.MODEL_DIR / "model_index.json").write_text("{}")
    (lora / runs.LORA_FILE).parent.mkdir()
    (lora / runs.LORA_FILE).write_bytes(b"")
    checkpoint = lora / runs.CHECKPOINTS / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / runs.STATE_FILE).write_text('{"step": 3}')
    with pytest.raises(ModelError, match=f"^model: {lora} is a training run; its result is a LoRA: use --lora {lora}$"):
        resolve_model(str(lora))
    lookups = {
        full: f"lora: {full} is a training run; its result is a full fine-tune: use --model {full}",
        stopped: f"lora: {stopped} is a training run with no result yet (stopped at step 6); finish it with: "
                 f"dreamtty train --output {stopped} --resume latest",
        checkpoint: f"lora: {checkpoint} is a training checkpoint, not a result (of the run {lora}); its result is a "
                    f"LoRA: use --lora {lora}",
    }
    for path, error in lookups.items():
        with pytest.raises(RequestError) as err:
            find_extra("lora", str(path), Config(paths={"loras": [tmp_path / "loras"]}))
        assert str(err.value) == error
