"""The DreamBooth training loop (torch, accelerate, peft).

After diffusers' ``examples/dreambooth/train_dreambooth(_lora).py``: prior-preservation loss
(Ruiz et al. 2022), Min-SNR weighting (Hang et al. 2023) and offset noise, accelerate for
mixed precision, gradient accumulation, multi-GPU and checkpoint state. Trainable weights are
kept in fp32 under fp16/bf16 mixed precision, so the GradScaler never meets fp16 gradients.
"""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from backend.errors import DreamttyError, RequestError
from backend.events import TrainCheckpoint, TrainClassImages, TrainLog, TrainResume, TrainState, TrainStep, TrainValidation
from backend.families import FAMILIES
from backend.engine.loader import local_folder
from backend.models import ModelRef, resolve_model
from backend.safetext import first_line
from backend.training import runs
from backend.training.checkpoints import (WRITE_ERRORS, CheckpointError, abandon_past, any_process, load_checkpoint,
                                          load_newest, register_hooks, save_checkpoint, try_write, write_failure)
from backend.training.class_images import ensure_class_images
from backend.training.config import TrainRequest, check_precision
from backend.training.data import ImageSet, batch_generator
from backend.training.flat import FlatParameters
from backend.training.images import scan_images
from backend.training.launch import resume_checkpoint
from backend.training.modelparts import (
    LORA_TEXT_TARGETS, LORA_UNET_TARGETS, ModelParts, add_lora, encode, export, load_parts, tokenize,
)

VALIDATION_IMAGES = 2
MAX_GRAD_NORM = 1.0
BNB_CPU_SINCE = (0, 45)  # bitsandbytes runs its 8-bit optimizers on the CPU from this version
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit optimizer state
# Settings a checkpoint records beside its step (and the process count): a resume may change them, said, since the
# run then sees its images in another order than one that kept them.
STEPPING = ("batch_size", "grad_accum", "seed", "resolution", "center_crop", "random_flip")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(DreamttyError):
    """Training cannot go on; the message says why and what to do."""


def oom_message(req: TrainRequest, step: int, run_dir: Path) -> str:
    """Out of memory: name the settings that reduce memory (words for the CLI, train.yaml and the TUI alike)
    and the checkpoint that is kept."""
    tips = [setting for setting, on in (
        ("gradient checkpointing", not req.gradient_checkpointing),
        ("8-bit Adam", not req.use_8bit_adam),
        ("method lora", req.method == "full"),
        ("mixed precision fp16", req.mixed_precision in (None, "no")),
        ("the text encoder not trained", req.train_text_encoder),
    ) if on]
    tips.append(f"a smaller resolution (now {req.resolution}) or batch size (now {req.batch_size})")
    kept = newest_checkpoint(run_dir)
    return (f"out of GPU memory at step {step}; reduce memory with {', '.join(tips)}"
            + (f"; {kept} is kept: {runs.RESUME_HINT}" if kept else ""))


def newest_checkpoint(run_dir: Path) -> str | None:
    """The name of the run's newest complete checkpoint, None when it has none."""
    found = runs.list_checkpoints(run_dir)
    return found[-1][1].name if found else None


def _accelerator(req: TrainRequest, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    try:
        return Accelerator(
            mixed_precision=req.mixed_precision, gradient_accumulation_steps=req.grad_accum,
            log_with="tensorboard" if req.report_to == "tensorboard" else None,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        )
    except ValueError as exc:
        raise RequestError("mixed_precision", first_line(exc)) from None


def _keep_small_in_32_bits(flat: FlatParameters) -> None:
    """Buckets of parameters under MIN_8BIT_SIZE keep 32-bit state, as those parameters would have.

    bitsandbytes' manager is process-wide and keyed by ``id()``: every bucket is set, so a stale
    entry from an earlier optimizer cannot apply to a new tensor.
    """
    import bitsandbytes as bnb

    manager = bnb.optim.GlobalOptimManager.get_instance()
    for tensor in flat.tensors:
        manager.override_config(tensor, "optim_bits", 32 if any(tensor is t for t in flat.small) else 8)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to ``device``; cast only when the dtype changes (diffusers warns on every cast)."""
    return module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)


class DreamBoothTrainer:
    """One run: ``run()`` trains to ``max_steps`` or until stopped; returns the final state."""

    def __init__(self, req: TrainRequest, run_dir: Path, events: runs.EventWriter,
                 should_stop: Callable[[], bool] = lambda: False, parts: ModelParts | None = None) -> None:
        """``parts``: an already built model (benchmarks); default: load ``req.model``."""
        self.req, self.run_dir, self.events, self.should_stop = req, Path(run_dir), events, should_stop
        self.parts = parts
        self.acc = _accelerator(req, self.run_dir)
        self.device = self.acc.device
        check_precision(req.method, self.acc.mixed_precision, self.device.type == "cpu")  # e.g. accelerate's config
        self.weight_dtype = _DTYPES.get(self.acc.mixed_precision, torch.float32)
        self.main = self.acc.is_main_process
        self.step = 0
        self.saved = 0  # the step of the newest checkpoint: where a resume goes on from

    # -- setup -------------------------------------------------------------
    def _class_images(self, model: ModelRef) -> list[Path]:
        req = self.req
        report = lambda done, total: self.events(TrainClassImages(done=done, total=total))  # noqa: E731
        return ensure_class_images(
            model, req.class_prompt, req.num_class_images, req.resolution, req.seed,
            self.device, self.acc.process_index, self.acc.num_processes, report, self.acc.wait_for_everyone,
            self._warn,
        )

    def _warn(self, message: str) -> None:
        self.events(TrainLog(level="warning", message=message))

    def _setup_models(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.training_utils import cast_training_params

        req, dev, dtype = self.req, self.device, self.weight_dtype
        set_seed(req.seed)  # LoRA init draws from the global RNG
        self.parts = parts = self.parts or load_parts(req.model)
        vae = parts.vae
        _place(vae, dev, torch.float32 if getattr(vae.config, "force_upcast", False) else dtype)
        self.trainables: dict[str, torch.nn.Module] = {}
        encoders = ["text_encoder", "text_encoder_2"][: len(parts.text_encoders)]
        training = {"unet", *(encoders if req.train_text_encoder else [])}
        for name in ["unet", *encoders]:
            module = getattr(parts.pipe, name)
            trains = name in training
            if req.method == "full" and trains:
                _place(module, dev, torch.float32).requires_grad_(True)
            else:
                _place(module, dev, dtype)
                if trains:
                    add_lora(module, req.rank, LORA_UNET_TARGETS if name == "unet" else LORA_TEXT_TARGETS)
            if trains:
                self.trainables[name] = module
                if req.gradient_checkpointing:
                    if name == "unet":
                        module.enable_gradient_checkpointing()
                    else:
                        module.gradient_checkpointing_enable()
        if dtype != torch.float32:
            cast_training_params(list(self.trainables.values()), dtype=torch.float32)
        params = [p for m in self.trainables.values() for p in m.parameters() if p.requires_grad]
        optimizer_class = self._optimizer_class()
        # The optimizer steps a few flat tensors (flat.py). DDP reduces into their gradients' views, and
        # the checkpoint's optimizer state has the same layout for any number of processes.
        small = MIN_8BIT_SIZE if req.use_8bit_adam else 0
        self.flat = FlatParameters(params, small_numel=small)
        optimizer = optimizer_class(self.flat.tensors, lr=req.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        if req.use_8bit_adam:
            _keep_small_in_32_bits(self.flat)
        prepared = self.acc.prepare(*self.trainables.values(), optimizer, self._lr_scheduler(optimizer))
        *modules, self.optimizer, self.lr_scheduler = prepared
        self.trainables = dict(zip(self.trainables, modules))
        register_hooks(self.acc)

    def _optimizer_class(self) -> type:
        if self.req.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise RequestError("use_8bit_adam", "needs bitsandbytes: pip install bitsandbytes") from None
            if self.device.type != "cuda" and tuple(map(int, bnb.__version__.split(".")[:2])) < BNB_CPU_SINCE:
                raise RequestError("use_8bit_adam", "on the CPU needs bitsandbytes >= 0.45")
            return bnb.optim.AdamW8bit
        return torch.optim.AdamW

    def _lr_scheduler(self, optimizer):
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared scheduler once per process for each optimizer step.
        n, req = self.acc.num_processes, self.req
        return get_scheduler(req.lr_scheduler, optimizer, num_warmup_steps=req.lr_warmup_steps * n,
                             num_training_steps=req.max_steps * n)

    def _apply_schedule(self, base_lrs: list[float], step: int) -> None:
        """Set the loaded optimizer's lr from this run's schedule (``base_lrs``, --max-steps) at the loaded ``step``.

        The checkpoint holds its own lr and schedule; a resume with a larger --max-steps (a cosine no
        longer at its end) or another --lr must apply from the first step on. Its schedule position and
        accelerate's micro-batch count are those of its process count and --grad-accum: both are set anew for
        this run's.
        """
        schedule = self.lr_scheduler.scheduler  # accelerate's wrapper holds diffusers' LambdaLR
        schedule.last_epoch = step * self.acc.num_processes  # see _lr_scheduler
        self.acc.step = step * self.req.grad_accum  # an optimizer step every grad_accum micro-batches from here
        schedule.base_lrs = list(base_lrs)
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, schedule.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(schedule.last_epoch)

    def _stepping(self) -> dict:
        """This run's settings that decide which images each step sees (recorded in its checkpoints)."""
        return {**{name: getattr(self.req, name) for name in STEPPING}, "processes": self.acc.num_processes}

    def _say_changes(self, state: dict, step: int) -> None:
        """Warn of each setting of :func:`_stepping` this resume changes from its checkpoint's ``state`` (the main
        process's events alone are written)."""
        then = state.get("stepping") if isinstance(state.get("stepping"), dict) else {}  # none before 2026-12-08
        for name, now in self._stepping().items():
            if then.get(name, now) != now:
                self._warn(f"resume: {name} is {now}, the checkpoint's {then[name]}: the run goes on from step "
                           f"{step}, its images in another order than a run that kept it")

    def _abandon_past(self, checkpoint: Path, step: int) -> None:
        """Move aside the checkpoints of the branch this resume leaves: those past ``step`` (also a damaged one
        passed over), or all of them when ``checkpoint`` is not among them (an abandoned branch taken up again)."""
        ours = checkpoint.resolve().parent == (self.run_dir / runs.CHECKPOINTS).resolve()
        try:
            names, aside = abandon_past(self.run_dir, step if ours else None)
        except OSError as exc:
            self._warn(f"resume from step {step}: the checkpoints of the branch left behind not moved aside: "
                       f"{exc.strerror or exc}")
            return
        if names:
            left = ", ".join(names)
            self._warn(f"resume from step {step}: {left} (of the branch left behind) moved to {aside}")

    @torch.no_grad()
    def _setup_conditioning(self) -> None:
        """Token ids per prompt; with frozen text encoders, the embeddings once (then the encoders leave the GPU)."""
        parts, dev = self.parts, self.device
        prompts = {"instance": self.req.instance_prompt}
        if self.req.prior:
            prompts["class"] = self.req.class_prompt
        self.ids = {k: [i.to(dev) for i in tokenize(parts, p)] for k, p in prompts.items()}
        self.embeds = {}
        if "text_encoder" not in self.trainables:
            for key, ids in self.ids.items():
                hidden, pooled = encode(parts.text_encoders, parts.xl, ids)
                self.embeds[key] = (hidden.to(self.weight_dtype), None if pooled is None else pooled.to(self.weight_dtype))
            for te in parts.text_encoders:
                te.to("cpu")

    @torch.no_grad()
    def _setup_latent_cache(self) -> None:
        """Encode every image once (both flips when random_flip); each keeps one crop."""
        self.latent_cache: dict[tuple[str, int, bool], tuple[torch.Tensor, tuple, tuple]] = {}
        if not self.req.cache_latents:
            return
        vae = self.parts.vae
        for key, images in self.sets.items():
            for index in range(len(images.files)):
                for flipped in (False, True) if images.random_flip else (False,):
                    sample = images.load(index, flipped, images.fixed_crop_generator(index))
                    pixels = sample.pixels[None].to(self.device, vae.dtype)
                    params = vae.encode(pixels).latent_dist.parameters[0]
                    self.latent_cache[(key, index, flipped)] = (params, sample.original_size, sample.crop_top_left)
        vae.to("cpu")

    def setup(self) -> int:
        """Class images, models, optimizer, resume, conditioning; returns the step to start from."""
        req = self.req
        model = resolve_model(req.model)
        # One process builds the demo or fetches the hub model, the others then find it. (transformers
        # writes model files on rank 0 only, so a demo built by another rank would lack its text encoder.)
        with self.acc.main_process_first():
            local_folder(model)
        class_files = self._class_images(model) if req.prior else []
        inst_files = scan_images(req.instance_dir, req.resolution).files
        self.sets = {"instance": ImageSet(inst_files, req.resolution, req.center_crop, req.random_flip, req.seed)}
        if req.prior:
            if not class_files:
                raise TrainingError("num_class_images: no class images could be generated")
            self.sets["class"] = ImageSet(class_files, req.resolution, req.center_crop, req.random_flip, req.seed + 1)
        self._setup_models()
        start = 0
        checkpoint = resume_checkpoint(self.run_dir, req.resume)
        if checkpoint is not None:
            # "latest" is the newest state that loads: a damaged checkpoint (power cut, full disk) is passed over,
            # with a warning, and with none that loads the run starts again (it failed for good: every resume
            # found the same). A checkpoint named by the user loads or fails.
            base_lrs = list(self.lr_scheduler.scheduler.base_lrs)  # this run's --lr, before the load replaces it
            if req.resume == "latest":
                loaded = load_newest(self.acc, [p for _, p in runs.list_checkpoints(self.run_dir)], self._warn)
            else:
                loaded = checkpoint, load_checkpoint(self.acc, checkpoint)
            if loaded is None:  # every one is moved aside below (all are past step 0)
                self._warn("resume: no checkpoint of this run loads; it starts again from step 0")
                self.events(TrainResume(step=0, checkpoint=None))
            else:
                checkpoint, state = loaded
                start = self.saved = int(state["step"])
                self._apply_schedule(base_lrs, start)
                self._say_changes(state, start)
                self.events(TrainResume(step=start, checkpoint=str(checkpoint)))
            self.acc.wait_for_everyone()  # every process has loaded before a checkpoint is moved
            if self.main:
                self._abandon_past(checkpoint, start)
        elif req.resume is not None:  # nothing saved yet: start over (drops the old steps from the curve)
            self.events(TrainResume(step=0, checkpoint=None))
        self._setup_conditioning()
        self._setup_latent_cache()
        if req.report_to == "tensorboard":
            self.acc.init_trackers("dreamtty", config={k: v for k, v in req.to_dict().items()
                                                        if isinstance(v, (int, float, str, bool))})
        return start

    # -- one micro-batch ---------------------------------------------------------
    def _latents(self, picks: list[tuple[str, int, bool]], gen: torch.Generator):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.parts.vae
        if self.latent_cache:
            cached = [self.latent_cache[p] for p in picks]
            dist = DiagonalGaussianDistribution(torch.stack([c[0] for c in cached]))
            meta = [(c[1], c[2]) for c in cached]
        else:
            crop_gen = None if self.req.center_crop else gen
            samples = [self.sets[key].load(index, flipped, crop_gen) for key, index, flipped in picks]
            with torch.no_grad():
                pixels = torch.stack([s.pixels for s in samples]).to(self.device, vae.dtype)
                dist = vae.encode(pixels).latent_dist
            meta = [(s.original_size, s.crop_top_left) for s in samples]
        latents = dist.sample(generator=gen)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor, meta

    def _text(self, counts: dict[str, int]):
        """Text conditioning for ``counts[kind]`` samples of each kind (instance first)."""
        if self.embeds:
            hidden = torch.cat([self.embeds[k][0].expand(n, -1, -1) for k, n in counts.items()])
            pooled = [self.embeds[k][1] for k in counts]
            pooled = None if pooled[0] is None else torch.cat([p.expand(n, -1) for p, n in zip(pooled, counts.values())])
            return hidden, pooled
        ids = [torch.cat([self.ids[k][j].expand(n, -1) for k, n in counts.items()]) for j in range(len(self.parts.tokenizers))]
        encoders = [self.trainables.get(name) for name in ("text_encoder", "text_encoder_2")][: len(ids)]
        return encode(encoders, self.parts.xl, ids)

    def _loss(self, micro: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        req, acc, sched = self.req, self.acc, self.parts.noise_scheduler
        gen = batch_generator(req.seed, micro, acc.process_index, acc.num_processes)
        position = (micro * acc.num_processes + acc.process_index) * req.batch_size
        picks = []
        for key, images in self.sets.items():
            picks += [(key, i, images.flip(gen)) for i in images.order.take(position, req.batch_size)]
        latents, meta = self._latents(picks, gen)
        noise = torch.randn(latents.shape, generator=gen)
        if req.offset_noise:  # offset noise (Guttenberg 2023): a per-channel constant shift
            noise = noise + req.offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (len(picks),), generator=gen)
        noise, timesteps = noise.to(self.device, latents.dtype), timesteps.to(self.device)
        noisy = sched.add_noise(latents, noise, timesteps)
        hidden, pooled = self._text({k: req.batch_size for k in self.sets})
        extra = {}
        if self.parts.xl:
            res = req.resolution
            time_ids = torch.tensor([[*size, *crop, res, res] for size, crop in meta], device=self.device)
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(self.weight_dtype)}
        pred = self.trainables["unet"](noisy.to(self.weight_dtype), timesteps, hidden, **extra).sample.float()
        pred_type = sched.config.prediction_type
        target = noise if pred_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        target = target.float()
        prior = None
        if req.prior:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            prior = F.mse_loss(pred_prior, target_prior)
        if req.snr_gamma is None:
            loss = F.mse_loss(pred, target)
        else:  # Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR (eps) or / (SNR+1) (v)
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sched, timesteps[: len(pred)])
            weight = torch.clamp(snr, max=req.snr_gamma) / (snr if pred_type == "epsilon" else snr + 1)
            loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        total = loss if prior is None else loss + req.prior_loss_weight * prior
        return total, prior

    # -- the loop ----------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Whether a stop was asked (by the launcher, or the STOP file). A run folder that is gone (removed,
        moved) fails the run: its checkpoints went with it, and a new folder would hold a run with no settings."""
        taken = self._take_stop_file()
        stop = any_process(self.acc, self.should_stop() or taken)
        if any_process(self.acc, not (self.run_dir / runs.RUN_JSON).is_file()):
            raise TrainingError(f"the run folder {self.run_dir} was removed or moved while training; stopped")
        return stop

    def _take_stop_file(self) -> bool:
        """Whether the STOP file is there. The main process removes it as it takes the request, so that whoever
        made it can tell a request taken from one it may still take back (``launch.withdraw_stop``)."""
        stop_file = self.run_dir / runs.STOP_FILE
        if not self.main:
            return stop_file.exists()
        try:
            stop_file.unlink()
        except OSError:  # none; or a folder that cannot be written, where the request stands
            return stop_file.exists()
        return True

    def _checkpoint(self, step: int) -> None:
        state = {"step": step, "stepping": self._stepping()}
        try:
            path = save_checkpoint(self.acc, self.run_dir, step, state, self.req.keep_checkpoints)
        except CheckpointError as exc:
            self.events(TrainLog(level="warning", message=str(exc)))
            return
        self.saved = step
        self.events(TrainCheckpoint(step=step, path=str(path)))
        if self.main:
            try:
                runs.update_run_json(self.run_dir, step=step, checkpoint=str(path))
            except OSError as exc:  # the checkpoint is saved; a resume finds it without run.json
                self._warn(f"run.json not updated at step {step}: {exc.strerror or exc}")

    def train_step(self, micro: int) -> tuple[float, float | None]:
        """One optimizer step over ``grad_accum`` micro-batches from ``micro``: (loss, prior loss)."""
        losses, priors = [], []
        modules = list(self.trainables.values())
        for k in range(self.req.grad_accum):
            with self.acc.accumulate(*modules):
                loss, prior = self._loss(micro + k)
                self.acc.backward(loss)
                if self.acc.sync_gradients:  # the step's last micro-batch
                    self.acc.clip_grad_norm_(self.flat.tensors, MAX_GRAD_NORM)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.flat.release_grads()
            losses.append(loss.detach())
            if prior is not None:
                priors.append(prior.detach())
        mean = lambda xs: self.acc.reduce(torch.stack(xs).mean(), reduction="mean").item()  # noqa: E731
        return mean(losses), (mean(priors) if priors else None)

    def run(self) -> str:
        req = self.req
        step = self.step = self.setup()
        times: deque[float] = deque(maxlen=10)
        n = self.acc.num_processes  # each takes its own images (_loss)
        while step < req.max_steps:
            began = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # this step's
            loss, prior = self.train_step(step * req.grad_accum)
            step = self.step = step + 1
            times.append(time.perf_counter() - began)
            its = len(times) / sum(times)
            mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            self.events(TrainStep(step=step, max_steps=req.max_steps, loss=loss, prior_loss=prior, lr=lr,
                                  its=round(its, 4), mem_gib=None if mem is None else round(mem, 3),
                                  epoch=self.sets["instance"].order.epoch(step * req.grad_accum * n * req.batch_size)))
            if req.report_to == "tensorboard":
                self.acc.log({"loss": loss, "lr": lr, **({"prior_loss": prior} if prior is not None else {})}, step=step)
            stopping = self._stop_requested()
            # The last step too, so that a larger --max-steps with --resume latest continues a finished run.
            if stopping or step % req.checkpoint_every == 0 or step == req.max_steps:
                self._checkpoint(step)
            if stopping:
                return "stopped"
            if req.validation_prompt and step % req.validation_every == 0:
                self.validate(step)
        if req.validation_prompt and step % req.validation_every:
            self.validate(step)
        self._export()
        return "done"

    # -- validation and export ------------------------------------------------------
    @contextmanager
    def _all_on_device(self):
        """Bring parts that left the GPU (frozen text encoders, cached-latents VAE) back for a while."""
        parts = self.parts
        moved = [m for m in (*parts.text_encoders, parts.vae) if m.device != self.device]
        for module in moved:
            module.to(self.device)
        try:
            yield
        finally:
            for module in moved:
                module.to("cpu")

    @torch.no_grad()
    def validate(self, step: int) -> None:
        if not self.main:
            return
        req, pipe = self.req, self.parts.pipe
        modules = list(self.trainables.values())
        for module in modules:
            module.eval()
        try:
            with self._all_on_device(), self.acc.autocast():
                gens = [torch.Generator().manual_seed(req.seed + i) for i in range(VALIDATION_IMAGES)]
                images = pipe(prompt=[req.validation_prompt] * VALIDATION_IMAGES, generator=gens,
                              num_inference_steps=FAMILIES[self.parts.family].default_steps,
                              height=req.resolution, width=req.resolution).images
        finally:
            for module in modules:
                module.train()
        paths = [self.run_dir / "validation" / f"step-{step:06d}-{i}.png" for i in range(len(images))]
        reason = try_write(lambda: _save_images(images, paths))
        if reason:  # a full disk: the run goes on, as when a checkpoint cannot be saved
            self._warn(f"validation images of step {step} not saved: {reason}")
            return
        self.events(TrainValidation(step=step, images=list(map(str, paths))))

    def _export(self) -> None:
        self.acc.wait_for_everyone()
        if not self.main:
            return
        modules = {name: self.acc.unwrap_model(m) for name, m in self.trainables.items()}
        try:
            kind, path = export(self.parts, self.req.method, self.run_dir, modules)
        except WRITE_ERRORS as exc:
            reason = write_failure(exc)
            if reason is None:
                raise
            kept = newest_checkpoint(self.run_dir)  # the last step's, unless the disk could not take it either
            fix = runs.write_fix(exc)
            then = f"{kept} is kept: {fix}, then {runs.RESUME_HINT}" if kept else f"{fix} and train again"
            raise TrainingError(f"the result was not saved in {self.run_dir}: {reason}; {then}") from None
        runs.update_run_json(self.run_dir, output={"kind": kind, "path": str(path)})
        self.events(TrainLog(level="info", message=f"saved {kind}: {path}"))
        if self.req.report_to == "tensorboard":
            self.acc.end_training()


def _save_images(images: list, paths: list[Path]) -> None:
    paths[0].parent.mkdir(exist_ok=True)
    for image, path in zip(images, paths):
        image.save(path)


def train(req: TrainRequest, run_dir: Path, events: runs.EventWriter | None = None,
          should_stop: Callable[[], bool] = lambda: False) -> str:
    """Train one run in this process; record state in run.json and events. Returns the final state.

    Raises DreamttyError (one line) on bad input, out of memory or a failed load.
    """
    run_dir = Path(run_dir)
    events = events or runs.EventWriter(run_dir)
    trainer = DreamBoothTrainer(req, run_dir, events, should_stop)
    events.enabled = events.enabled and trainer.main
    if trainer.main:  # a STOP made while the model loaded stays (prepare_run removed any older one)
        runs.update_run_json(run_dir, state="running", pid=os.getpid(), error=None, error_kind=None)
    events(TrainState(state="running", max_steps=req.max_steps, device=str(trainer.device),
                      processes=trainer.acc.num_processes, mixed_precision=trainer.acc.mixed_precision))
    try:
        state = trainer.run()
    except torch.OutOfMemoryError:
        raise TrainingError(oom_message(req, trainer.step + 1, run_dir)) from None
    if trainer.main:
        runs.update_run_json(run_dir, state=state, step=trainer.step, saved=trainer.saved)
    message = runs.stop_message(trainer.step, trainer.saved) if state == "stopped" else None
    events(TrainState(state=state, step=trainer.step, message=message))
    return state
