"""Typed configuration of the step-aware preference model (SPM) stages: ``noisy_pairs`` and ``train_pm``.

Defaults follow the SPO paper / reference code for SD-1.5 (REFERENCE.md section 3); the SDXL and toy
values live in the profiles.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..config import LaunchConfig, ModelConfig, OptimConfig, ScorerConfig, Strict, check_divisible

# The timesteps at which the paper reports preference-model accuracy.
PAPER_EVAL_TIMESTEPS = (0, 251, 501, 701, 951)

Variant = Literal["plain", "agnostic", "aware"]


class NoisyPairsConfig(Strict):
    """Stage ``noisy_pairs``: turn human-labelled pairs into (x0-estimate, x0-estimate, t, label) pairs.

    Writes ``output_dir/train`` (t ~ U{0..999}, one draw per pair and repeat) and ``output_dir/eval``
    (every held-out, non-tied pair at each of ``eval_timesteps``).
    """

    model: ModelConfig  # the frozen base diffusion model whose x0 estimates the PM learns to judge
    data: str  # Pick-a-Pic-schema parquet file / folder of shards, or a hub id (needs `datasets`)
    split: str = "train"  # hub split of ``data``
    # Held-out preference split: a separate source (path or hub id) or None to carve whole captions
    # out of ``data`` (so no held-out prompt is seen in training).
    eval_data: str | None = None
    eval_split: str = "validation_unique"
    eval_pairs: int = Field(default=500, ge=0)  # non-tied held-out pairs (0: no evaluation set)
    eval_timesteps: list[int] = Field(default_factory=lambda: list(PAPER_EVAL_TIMESTEPS))
    # At t = 0 evaluate the clean image (as the reference code does) rather than a one-step estimate.
    clean_eval_at_zero: bool = True
    # The reference code's SDXL recipe: replace the human labels of both splits by a scorer's
    # judgement of the clean images (PickScore; a tie unless |softmax difference| > threshold).
    relabel: ScorerConfig | None = None
    relabel_threshold: float = Field(default=0.1, ge=0.0, lt=1.0)
    output_dir: str = "artifacts/pm_data"
    # Side of the stored square images: the PM's input size (224 for PickScore); None keeps the
    # diffusion model's resolution and lets the scorer's preprocessing resize.
    image_size: int | None = Field(default=224, gt=0)
    guidance_scale: float = Field(default=5.0, ge=0.0)
    batch_size: int = Field(default=8, ge=1)  # pairs per UNet call (2 * batch_size images)
    shard_size: int = Field(default=512, ge=1)  # pairs per shard (the unit of resumption)
    max_pairs: int | None = Field(default=None, ge=1)  # bound on training entries
    repeats: int = Field(default=1, ge=1)  # independent (t, noise) draws per training pair
    num_train_timesteps: int = Field(default=1000, ge=1)
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = Field(default=None, ge=1)  # torch CPU threads (None: torch's default)
    # DataLoader workers that read and decode the source images (0: in the main process). Results
    # do not depend on it.
    num_workers: int = Field(default=2, ge=0)
    # stored: build the training x0 estimates here, in resumable shards (~301 KB per pair at 224 px);
    # on_the_fly: store nothing and let train_pm compute them per batch (the reference code's way:
    # no disk, but one guided UNet + VAE call per pair and epoch, and the base model in train_pm).
    # The evaluation set is stored either way.
    train_pairs: Literal["stored", "on_the_fly"] = "stored"
    # Several processes (one per GPU): each builds its share of the shards, the same shards as one.
    launch: LaunchConfig = LaunchConfig()

    @field_validator("eval_timesteps")
    @classmethod
    def _timesteps_ok(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"eval_timesteps {v} has duplicates")
        if any(t < 0 or t > 999 for t in v):
            raise ValueError(f"eval_timesteps {v} must lie in 0..999")
        return v


class TrainPMConfig(Strict):
    """Stage ``train_pm``: train and evaluate the paper's Table-4 preference-model variants."""

    # The CLIP the variants start from: a CLIPModel directory or hub id (PickScore_v1 for real runs).
    base: str = "yuvalkirstain/PickScore_v1"
    # Tokenizer + preprocessor_config.json source; None: ``base`` itself, or
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K when ``base`` is the PickScore hub id.
    processor: str | None = None
    data_dir: str = "artifacts/pm_data"  # the noisy_pairs output (train/ and eval/)
    output_dir: str = "artifacts/pm"  # one model directory per trained variant + accuracy.md
    # None: <output_dir>/checkpoints. Inside: <variant>/<fingerprint of the configuration>/step-N, so
    # a changed configuration starts fresh and the same one resumes (see spo_core.checkpoints).
    checkpoint_dir: str | None = None
    variants: list[Variant] = Field(default_factory=lambda: ["plain", "agnostic", "aware"])
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=3e-6, weight_decay=0.3, max_grad_norm=1.0))
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = Field(default=0, ge=0)
    # Pairs per micro-batch over all processes (each takes an equal share): the pairs a run consumes,
    # max_steps x batch_size x gradient_accumulation_steps, do not depend on the number of processes.
    batch_size: int = Field(default=16, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=8000, ge=1)  # optimiser steps
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False  # trade compute for activation memory (ViT-H on small GPUs)
    checkpoint_every: int = Field(default=500, ge=1)  # optimiser steps
    keep_checkpoints: int = Field(default=2, ge=1)
    resume: bool = True  # continue from the newest checkpoint of each variant (and skip finished ones)
    eval_every: int | None = Field(default=None, ge=1)  # also evaluate during training (curves)
    eval_batch_size: int = Field(default=32, ge=1)
    log_every: int = Field(default=10, ge=1)
    num_workers: int = Field(default=0, ge=0)
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = Field(default=None, ge=1)  # torch CPU threads (None: torch's default)
    launch: LaunchConfig = LaunchConfig()

    # Memory switch (same gradients) and the in-training evaluation, which only draws MLflow curves.
    OPERATIONAL = Strict.OPERATIONAL | {"gradient_checkpointing", "eval_every", "eval_batch_size"}

    @model_validator(mode="after")
    def _check(self) -> "TrainPMConfig":
        if not self.variants:
            raise ValueError("variants is empty: list at least one of plain, agnostic, aware")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants {self.variants} has duplicates")
        check_divisible(self.batch_size, "batch_size", self.launch.num_processes)
        return self
