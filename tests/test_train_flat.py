"""Flat parameters (backend/training/flat.py): the same training as per-tensor parameters, a few optimizer tensors."""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path

import pytest
import torch

from backend.errors import RequestError
from backend.training import trainer as trainer_module
from backend.training import runs
from backend.training.config import TrainRequest
from backend.training.flat import FlatParameters
from backend.training.launch import prepare_run
from backend.training.runs import EventWriter
from backend.training.trainer import DreamBoothTrainer
from tests.test_train import _losses, _request, _run, photos  # noqa: F401  (photos: a fixture)


@pytest.mark.parametrize("bucket_numel", [10**6, 100])  # one bucket; two (8*16 + 16 > 100)
def test_flat_parameters_train_exactly_like_separate_ones(bucket_numel):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ref = copy.deepcopy(net)
    flat = FlatParameters(list(net.parameters()), bucket_numel)
    assert [len(b.params) for b in flat.buckets] == ([4] if bucket_numel > 1000 else [1, 3])
    assert sum(t.numel() for t in flat.tensors) == sum(p.numel() for p in ref.parameters())
    opt = torch.optim.AdamW(flat.tensors, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(5, 8)
    for _ in range(3):
        for k in (1, 2):  # two accumulated backward passes
            net(x * k).pow(2).mean().backward()
            ref(x * k).pow(2).mean().backward()
        grad = net[2].bias.grad
        assert grad.untyped_storage().data_ptr() == flat.tensors[-1].grad.untyped_storage().data_ptr()
        torch.testing.assert_close(grad, ref[2].bias.grad)
        torch.nn.utils.clip_grad_norm_(flat.tensors, 0.05)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        ref_opt.step()
        flat.release_grads()
        ref_opt.zero_grad(set_to_none=True)
        assert net[0].weight.grad is None and all(t.grad is None for t in flat.tensors)
    for ours, theirs in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    storages = {p.untyped_storage().data_ptr() for p in net.parameters()}
    assert storages == {t.untyped_storage().data_ptr() for t in flat.tensors}


def _launch_workers(launcher: list[str], out: Path) -> subprocess.CompletedProcess:
    worker = Path(__file__).with_name("ddp_bucket_worker.py")
    return subprocess.run([*launcher, str(worker), str(out)], capture_output=True, text=True, timeout=240)


def test_ddp_reduces_into_bucket_gradients(tmp_path, two_process_launcher):
    """Two gloo processes, launched the way users launch the trainer.

    A worker killed by a signal (gloo's TCP transport aborted once in ~20 CI runs, never locally in 100+)
    gets one more launch; an exception or a wrong gradient in our code fails at once.
    """
    done = _launch_workers(two_process_launcher, tmp_path)
    if done.returncode != 0 and "(exitcode: -" in done.stderr:
        done = _launch_workers(two_process_launcher, tmp_path)
    workers_said = done.stderr.split("failed (exitcode")[0]  # what the workers printed, before the launcher's report
    assert done.returncode == 0, workers_said[-3000:]
    first, second = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    for ours, theirs, other in zip(first["flat"], first["separate"], second["flat"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # the same averaged gradients
        torch.testing.assert_close(ours, other, rtol=0, atol=0)  # the processes stay in step


def test_bucket_gradients_are_allocated_as_backward_reaches_them():
    """The first layer's bucket has no gradient yet while backward fills the last layer's."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    flat = FlatParameters(list(net.parameters()), bucket_numel=64 * 64 + 64)
    first, last = flat.buckets
    seen = []
    net[1].weight.register_hook(lambda g: seen.append((first.flat.grad is None, last.flat.grad is not None)))
    net(torch.randn(2, 64)).sum().backward()
    assert seen == [(True, True)]
    assert first.flat.grad is not None and net[0].weight.grad.untyped_storage().data_ptr() == (
        first.flat.grad.untyped_storage().data_ptr())


def test_flat_parameters_need_one_dtype():
    with pytest.raises(ValueError, match="one dtype and device"):
        FlatParameters([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])


def _trainer_losses(photos, tmp_path, name: str, steps: int = 3) -> tuple[list[float], DreamBoothTrainer]:
    request = TrainRequest(model="demo", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                           resolution=64, max_steps=steps, grad_accum=2, seed=7, prior_preservation=False,
                           method="full", train_text_encoder=True, output=str(tmp_path / name))
    prepared = prepare_run(request)
    trainer = DreamBoothTrainer(prepared.request, prepared.run_dir, EventWriter(prepared.run_dir, enabled=False))
    trainer.setup()
    losses = [trainer.train_step(step * 2)[0] for step in range(steps)]
    return losses, trainer


def test_trainer_steps_flat_buckets_with_the_same_losses(photos, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(trainer_module, "FlatParameters", functools.partial(FlatParameters, bucket_numel=20_000))
    flat_losses, flat = _trainer_losses(photos, tmp_path, "flat")
    assert [len(g["params"]) for g in flat.optimizer.param_groups] == [len(flat.flat.buckets)]
    assert 3 < len(flat.flat.buckets) < 100
    storages = {t.untyped_storage().data_ptr() for t in flat.flat.tensors}
    trained = [p for m in flat.trainables.values() for p in m.parameters() if p.requires_grad]
    assert len(trained) > 100 and {p.untyped_storage().data_ptr() for p in trained} == storages

    monkeypatch.setattr(trainer_module, "FlatParameters", functools.partial(FlatParameters, bucket_numel=1))
    separate_losses, separate = _trainer_losses(photos, tmp_path, "separate")
    assert len(separate.optimizer.param_groups[0]["params"]) > 100
    assert flat_losses == pytest.approx(separate_losses, rel=1e-5)
    unet, ref = flat.trainables["unet"], separate.trainables["unet"]
    for (name, ours), (_, theirs) in zip(unet.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


def test_8bit_adam_on_flat_parameters_resumes_exactly(photos, tmp_path, monkeypatch):  # noqa: F811
    """bitsandbytes' 8-bit AdamW (on the CPU here) steps the buckets; its state survives a resume.

    Parameters under bitsandbytes' min_8bit_size share a bucket whose state stays 32-bit, as theirs would.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = dict(method="full", use_8bit_adam=True, max_steps=4, checkpoint_every=2, prior_preservation=False)
    reference = _run(_request(photos, tmp_path / "reference", **settings))
    first = _run(_request(photos, tmp_path / "resumed", **{**settings, "max_steps": 2}))
    state = torch.load(runs.list_checkpoints(first)[-1][1] / "optimizer.bin", weights_only=False)["state"]
    kinds = sorted(str(s["state1"].dtype if "state1" in s else s["__bnb_optimizer_quant_state__"]["state1"].dtype)
                   for s in state.values())
    assert kinds == ["torch.float32", "torch.uint8"]  # a large bucket (8-bit) and a small one (32-bit)
    _run(_request(photos, tmp_path / "resumed", **{**settings, "resume": "latest"}))
    assert _losses(first) == pytest.approx(_losses(reference), rel=1e-5)
    assert sorted(_losses(first)) == [1, 2, 3, 4]


def test_small_parameters_get_their_own_buckets():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    flat = FlatParameters(list(net.parameters()), small_numel=4096)
    assert [t.numel() for t in flat.small] == [64 * 4]  # the biases and the norm, together
    assert [t.numel() for t in flat.tensors] == [2 * 64 * 64, 64 * 4]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process: start and leave this test with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_trains_fp32_master_weights(photos, tmp_path, monkeypatch, fresh_accelerate_state):  # noqa: F811
    """bf16 autocast; trained weights and their optimizer in fp32 (no bf16 master weights)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    request = TrainRequest(model="demo", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                           resolution=64, max_steps=2, seed=7, prior_preservation=False, method="full",
                           train_text_encoder=True, mixed_precision="bf16", output=str(tmp_path / "bf16"))
    prepared = prepare_run(request)
    trainer = DreamBoothTrainer(prepared.request, prepared.run_dir, EventWriter(prepared.run_dir, enabled=False))
    trainer.setup()
    weight = trainer.trainables["unet"].conv_in.weight
    before = weight.detach().clone()
    losses = [trainer.train_step(step)[0] for step in range(2)]
    assert all(0 < loss < 10 for loss in losses)
    assert trainer.acc.mixed_precision == "bf16" and trainer.weight_dtype == torch.bfloat16
    assert {t.dtype for t in trainer.flat.tensors} == {torch.float32} and weight.dtype == torch.float32
    assert not torch.equal(weight.detach(), before)  # the bf16 forward's gradients reached the fp32 weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on the CPU only")
def test_fp16_from_accelerates_config_is_refused_for_a_full_fine_tune_on_the_cpu(
        photos, tmp_path, monkeypatch, fresh_accelerate_state):  # noqa: F811
    """Refused before the model loads, in one line, where no mixed_precision was given (the run's device and
    accelerate's config are known only here)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # as `accelerate config` sets it
    prepared = prepare_run(TrainRequest(model="demo", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                                        resolution=64, method="full", output=str(tmp_path / "fp16")))
    with pytest.raises(RequestError, match="^mixed_precision: fp16 needs a CUDA GPU for a full fine-tune; use bf16 "
                                           "or no on the CPU$"):
        DreamBoothTrainer(prepared.request, prepared.run_dir, EventWriter(prepared.run_dir, enabled=False))
