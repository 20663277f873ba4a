"""Pretraining of the toy base model on freshly rendered images with noisy captions.

``kind: sd15``: the UNet and its text encoder learn the epsilon objective on SD-1.5's DDPM schedule.
``kind: sd3``: the SD3 transformer and its two CLIP encoders learn the rectified-flow objective:
x_t = (1 - t) x0 + t eps with t = sigmoid(N(logit_mean, logit_std)) (SD3's logit-normal sampling),
and the transformer regresses the velocity eps - x0. Both train jointly (AdamW) on rendered scenes. Some captions are wrong on
purpose (a wrong colour / shape / background) and some are empty (for classifier-free guidance),
so the base model follows prompts only partly and preference optimisation has something to fix.
Wrong captions never use a held-out colour x shape pair, so validation stays unseen.

Every step's data and noise come from generators seeded with (seed, step), so a run resumed from a
checkpoint (weights + optimiser + lr schedule, written atomically every ``checkpoint_every``
steps) ends with exactly the weights of an uninterrupted run. Checkpoints live in
``checkpoint_dir/<fingerprint of the run's configuration>/``: a changed configuration (``dvc exp
run -S toy_pretrain.lr=...``) starts fresh instead of meeting the old run's checkpoints, and once a
run completes the other configurations' checkpoints are removed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..checkpoints import CheckpointStore
from ..models.diffusion import DiffusionPolicy
from ..models.flow_policy import FlowPolicy
from .config import CaptionNoise, ToyPretrainConfig, WorldConfig
from .grammar import Scene, format_prompt, parse_many
from .models import build_toy_base
from .render import render_batch
from .world import LoadedWorld

log = logging.getLogger(__name__)



@dataclass
class PretrainResult:
    policy: DiffusionPolicy | FlowPolicy
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last entry)
    start_step: int = 0  # > 0 when resumed from a checkpoint
    train_seconds: float = 0.0  # wall time of the steps run in this call

    @property
    def steps_run(self) -> int:
        return (self.losses[-1][0] if self.losses else self.start_step) - self.start_step


# ------------------------------------------------------------------------------ data


def noisy_caption(scene: Scene, noise: CaptionNoise, world: WorldConfig, held: set[tuple[str, str]],
                  rng: np.random.Generator) -> str:
    """The caption of ``scene`` after caption noise (possibly empty, possibly with wrong attributes)."""
    if rng.random() < noise.p_empty:
        return ""
    if rng.random() < noise.p_wrong_colour:
        options = [c for c in world.colours if c != scene.colour and (c, scene.shape) not in held]
        scene = replace(scene, colour=options[rng.integers(len(options))]) if options else scene
    if rng.random() < noise.p_wrong_shape:
        options = [s for s in world.shapes if s != scene.shape and (scene.colour, s) not in held]
        scene = replace(scene, shape=options[rng.integers(len(options))]) if options else scene
    if rng.random() < noise.p_wrong_background:
        options = [b for b in world.backgrounds if b != scene.background]
        scene = replace(scene, background=options[rng.integers(len(options))])
    return format_prompt(scene)


def training_batch(step: int, cfg: ToyPretrainConfig, world: LoadedWorld, scenes: list[Scene],
                   held: set[tuple[str, str]]) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """Images, captions and a noise generator for ``step``: a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    picked = [scenes[i] for i in rng.integers(len(scenes), size=cfg.batch_size)]
    images = render_batch(picked, world.config.resolution, rng, world.config)
    captions = [noisy_caption(s, cfg.captions, world.config, held, rng) for s in picked]
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return images, captions, gen


# ------------------------------------------------------------------------------ checkpoints


FINGERPRINT_KEYS = {"seed", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "lr_schedule", "max_grad_norm",
                    "arch", "captions", "noise_offset"}
FLOW_FINGERPRINT_KEYS = {"kind", "transformer", "flow_shift", "logit_mean", "logit_std"}


def run_config(cfg: ToyPretrainConfig, world: WorldConfig) -> dict:
    """Everything that shapes the trained weights; a checkpoint only resumes a matching run."""
    keys = FINGERPRINT_KEYS | (FLOW_FINGERPRINT_KEYS if cfg.kind == "sd3" else set())
    return {"train": cfg.model_dump(mode="json", include=keys), "world": world.model_dump(mode="json")}


def trained_modules(policy: DiffusionPolicy | FlowPolicy) -> dict[str, torch.nn.Module]:
    """The networks pretraining updates, by pipeline component name."""
    if isinstance(policy, FlowPolicy):
        return {"transformer": policy.transformer, "text_encoder": policy.text_encoder,
                "text_encoder_2": policy.text_encoder_2}
    return {"unet": policy.unet, "text_encoder": policy.text_encoder}


def save_checkpoint(store: CheckpointStore, policy: DiffusionPolicy | FlowPolicy, opt, sched, step: int,
                    config: dict, losses: list[tuple[int, float]]) -> None:
    store.save(step, {name: m.state_dict() for name, m in trained_modules(policy).items()},
               {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, config, extra={"losses": losses})


def load_checkpoint(store: CheckpointStore, policy: DiffusionPolicy | FlowPolicy, opt, sched,
                    config: dict) -> tuple[int, list]:
    """Restore weights, optimiser and schedule from the latest checkpoint; returns (step, losses)."""
    ck = store.resume(config)
    if ck is None:
        return 0, []
    for name, module in trained_modules(policy).items():
        # strict=False for the text encoders' position_ids buffer
        module.load_state_dict(ck.tensors[name], strict=name in ("unet", "transformer"))
    opt.load_state_dict(ck.state["optimizer"])
    sched.load_state_dict(ck.state["lr_scheduler"])
    return ck.step, [tuple(x) for x in ck.manifest["losses"]]


# ------------------------------------------------------------------------------ training


def denoising_loss(policy: DiffusionPolicy | FlowPolicy, latents: torch.Tensor, captions: list[str],
                   gen: torch.Generator, cfg: ToyPretrainConfig) -> torch.Tensor:
    """The pretraining objective of the policy's family on clean ``latents`` (noise and times from ``gen``)."""
    noise = torch.randn(latents.shape, generator=gen)
    if isinstance(policy, FlowPolicy):
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(latents.shape[0], generator=gen))
        hidden, pooled = policy.encode_text(captions)
        pred = policy.velocity(policy.add_noise(latents, noise, t), t, hidden, pooled)
        return F.mse_loss(pred, policy.process.target(latents, noise))
    if cfg.noise_offset:  # drawn only when set, so runs without it keep their random stream
        noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen)
    sched = policy.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    ids = policy.tokenizer(captions, padding="max_length", max_length=policy.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    pred = policy.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=policy.text_encoder(ids)[0]).sample
    return F.mse_loss(pred, noise)


def train_base(cfg: ToyPretrainConfig, world: LoadedWorld,
               on_log: Callable[[int, float], None] | None = None) -> PretrainResult:
    """Train (or resume) the base model; ``on_log(step, mean_loss)`` is called every ``log_every`` steps."""
    wcfg = world.config
    policy = build_toy_base(cfg, world.tokenizer(), wcfg.resolution)
    modules = list(trained_modules(policy).values())
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(True).train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    config = run_config(cfg, wcfg)
    store = CheckpointStore.for_run(cfg.checkpoint_dir, config, keep=1)
    start, losses = 0, []
    if cfg.resume:
        start, losses = load_checkpoint(store, policy, opt, sched, config)
        if start:
            log.info("resumed pretraining from %s at step %d", store.root, start)
    else:
        store.clear()

    scenes = parse_many(world.train_prompts, wcfg)
    held = set(world.heldout_pairs)
    window: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="toy pretrain", initial=start, total=cfg.steps)
    for step in bar:
        images, captions, gen = training_batch(step, cfg, world, scenes, held)
        loss = denoising_loss(policy, policy.encode_images(images), captions, gen, cfg)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean = float(np.mean(window))
            losses.append((done, mean))
            window = []
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
            if on_log is not None:
                on_log(done, mean)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(store, policy, opt, sched, done, config, losses)
    store.prune_other_runs()  # this configuration is complete: other configurations' checkpoints go
    seconds = time.perf_counter() - t0
    for m in modules:
        m.requires_grad_(False).eval()
    return PretrainResult(policy=policy, losses=losses, start_step=start, train_seconds=seconds)
