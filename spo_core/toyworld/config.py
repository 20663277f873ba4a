"""Typed configuration of the toy world and of its four stages.

The world (vocabulary, palette, rendering jitter, ground-truth rater) is configured once, in the
``toy_world`` stage, and written to ``world.json``; every later stage reads it from the world
directory, so the ground truth cannot drift between stages.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..config import Strict

RGB = tuple[float, float, float]

SHAPES = ("circle", "square", "triangle", "diamond")


def _check_rgb(name: str, table: dict[str, RGB]) -> None:
    for key, rgb in table.items():
        if not all(0.0 <= c <= 1.0 for c in rgb):
            raise ValueError(f"{name}['{key}'] = {rgb}: RGB components must lie in [0, 1]")
        if not key.isalpha() or key != key.lower():
            raise ValueError(f"{name} key '{key}' must be one lower-case word (it appears in prompts)")


class RaterConfig(Strict):
    """Weights and tolerances of the ground-truth reward (see :mod:`spo_core.toyworld.rater`)."""

    alignment_weight: float = Field(default=0.7, ge=0)
    quality_weight: float = Field(default=0.3, ge=0)
    # Alignment components (normalised by their sum).
    colour_weight: float = Field(default=0.25, ge=0)
    background_weight: float = Field(default=0.25, ge=0)
    shape_weight: float = Field(default=0.2, ge=0)
    position_weight: float = Field(default=0.15, ge=0)
    size_weight: float = Field(default=0.15, ge=0)
    # Quality components (normalised by their sum).
    palette_weight: float = Field(default=0.6, ge=0)
    smoothness_weight: float = Field(default=0.4, ge=0)
    # A pixel "has" a colour with weight 1 within colour_near of it, 0 beyond colour_far (RGB distance).
    colour_near: float = Field(default=0.12, gt=0)
    colour_far: float = Field(default=0.30, gt=0)
    unmix_deadzone: float = Field(default=0.15, ge=0, lt=0.5)  # mixing fractions this close to 0 / 1 snap to it
    position_sigma: float = Field(default=0.10, gt=0)  # fraction of the image side
    size_sigma: float = Field(default=0.15, gt=0)  # on log(estimated / nominal half-extent)
    shape_temperature: float = Field(default=0.03, gt=0)  # softmax over template IoUs
    noise_scale: float = Field(default=0.2, gt=0)  # |pixel - 3x3 median| that counts as full noise
    # True: quality is earned only by a picture of something (scaled by the object's presence), so an
    # empty background (quality 1 otherwise) is not worth more than an imperfect object. Off by default:
    # measured, it did not help SPO (README, "The toy world").
    quality_needs_object: bool = False

    @model_validator(mode="after")
    def _check(self) -> "RaterConfig":
        if self.colour_far <= self.colour_near:
            raise ValueError(f"rater.colour_far ({self.colour_far}) must exceed rater.colour_near ({self.colour_near})")
        if self.alignment_weight + self.quality_weight <= 0:
            raise ValueError("rater.alignment_weight + rater.quality_weight must be > 0")
        return self


class WorldConfig(Strict):
    """The toy world: vocabulary, palette, held-out split, rendering and its ground truth."""

    colours: dict[str, RGB] = Field(default_factory=lambda: {
        "red": (0.90, 0.10, 0.10),
        "green": (0.10, 0.75, 0.15),
        "blue": (0.15, 0.30, 0.95),
        "yellow": (0.95, 0.90, 0.10),
        "orange": (1.00, 0.55, 0.00),
        "purple": (0.55, 0.15, 0.80),
        "pink": (1.00, 0.50, 0.75),
        "cyan": (0.10, 0.85, 0.90),
    })
    shapes: list[Literal["circle", "square", "triangle", "diamond"]] = Field(default_factory=lambda: list(SHAPES))
    # Half-extent of a shape (radius of the circle of equal area) as a fraction of the image side.
    sizes: dict[str, float] = Field(default_factory=lambda: {"small": 0.09, "medium": 0.14, "large": 0.20})
    backgrounds: dict[str, RGB] = Field(default_factory=lambda: {
        "white": (0.97, 0.97, 0.97),
        "black": (0.05, 0.05, 0.05),
        "gray": (0.50, 0.50, 0.50),
        "brown": (0.45, 0.30, 0.15),
    })
    # Prompts may leave size / position unsaid; the renderer then draws them at random.
    optional_size: bool = True
    optional_position: bool = True
    # Grid of positions: centres at these fractions of the side (3x3 grid: top/centre/bottom x left/centre/right).
    grid: tuple[float, float, float] = (0.25, 0.5, 0.75)
    heldout_pairs: int = Field(default=4, ge=1)  # colour x shape pairs that only validation prompts use
    n_validation: int = Field(default=500, ge=1)
    seed: int = 0
    resolution: int = Field(default=32, ge=8)
    position_jitter: float = Field(default=0.03, ge=0)  # +- fraction of the side
    size_jitter: float = Field(default=0.07, ge=0, lt=1)  # +- relative
    colour_jitter: float = Field(default=0.04, ge=0, lt=0.5)  # +- per channel
    rater: RaterConfig = RaterConfig()

    @field_validator("colours", "backgrounds")
    @classmethod
    def _rgb_ok(cls, v: dict[str, RGB], info) -> dict[str, RGB]:
        if not v:
            raise ValueError(f"{info.field_name} must not be empty")
        _check_rgb(info.field_name, v)
        return v

    @model_validator(mode="after")
    def _check(self) -> "WorldConfig":
        if len(set(self.shapes)) != len(self.shapes) or not self.shapes:
            raise ValueError(f"shapes must be distinct and non-empty, got {self.shapes}")
        clash = set(self.colours) & set(self.backgrounds)
        if clash:
            raise ValueError(f"colour names {sorted(clash)} appear both as object colours and backgrounds: rename one")
        for name, s in self.sizes.items():
            if not (0 < s < 0.5) or not name.isalpha():
                raise ValueError(f"sizes['{name}'] = {s}: need one word and a fraction in (0, 0.5)")
        if self.heldout_pairs >= len(self.colours) * len(self.shapes):
            raise ValueError("heldout_pairs must be smaller than the number of colour x shape pairs")
        if self.heldout_pairs > len(self.colours):
            raise ValueError(f"heldout_pairs ({self.heldout_pairs}) exceeds the number of colours ({len(self.colours)}): "
                             "each held-out pair uses a different colour so that every colour stays in training")
        return self


class ToyStage(Strict):
    """A toy-world stage. The real profiles set ``enabled: false``: the stage then only writes a
    marker output, so the one dvc.yaml serves every profile (see spo_core.stages.common)."""

    enabled: bool = True
    output_dir: str


class TokenizerConfig(Strict):
    max_length: int = Field(default=77, ge=8)  # CLIP's context length; pipelines pad to it


class ToyWorldConfig(ToyStage):
    """Stage ``toy_world``: prompt files, the world description and the tokenizer."""

    world: WorldConfig = WorldConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    output_dir: str = "artifacts/toy/world"


class UNetArch(Strict):
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    # Which resolution levels get (self + cross) attention; none at the finest level because CPU
    # attention over 16x16 tokens costs ~40% of a step while a 3x3 position grid needs no such detail.
    cross_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = Field(default=1, ge=1)
    attention_heads: int = Field(default=2, ge=1)  # diffusers' (misnamed) attention_head_dim
    norm_num_groups: int = Field(default=8, ge=1)
    latent_factor: Literal[1, 2] = 2  # PixelShuffleLatentMap factor: 32 px -> 16x16x12 latents
    text_hidden: int = Field(default=64, ge=8)
    text_layers: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "UNetArch":
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block_out_channels entry {self.block_out_channels} must be divisible by "
                             f"norm_num_groups={self.norm_num_groups}")
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(f"cross_attention {self.cross_attention} needs one flag per block in "
                             f"block_out_channels {self.block_out_channels}")
        return self


class TransformerArch(Strict):
    """The flow toy base (``kind: sd3``): an ``SD3Transformer2DModel`` on pixel-unshuffled latents with two
    CLIP text encoders (SD3's CLIP-L and CLIP-G) and no T5 (its tokens are zeros, as in diffusers)."""

    num_layers: int = Field(default=4, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    attention_head_dim: int = Field(default=16, ge=4)
    patch_size: int = Field(default=2, ge=1)
    latent_factor: Literal[1, 2] = 2  # PixelShuffleLatentMap factor, as UNetArch's
    text_hidden: int = Field(default=64, ge=8)  # each CLIP encoder's width (and projection)
    text_layers: int = Field(default=2, ge=2)  # SD3 reads the penultimate layer: at least 2
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5's MMDiT-X layers (none: SD3's layout)

    @model_validator(mode="after")
    def _check(self) -> "TransformerArch":
        if any(i >= self.num_layers for i in self.dual_attention_layers):
            raise ValueError(f"dual_attention_layers {self.dual_attention_layers} must index layers below "
                             f"num_layers={self.num_layers}")
        return self


class CaptionNoise(Strict):
    """Share of training captions that do not match their image (the base follows prompts only partly)."""

    p_empty: float = Field(default=0.1, ge=0, le=1)  # for classifier-free guidance
    p_wrong_colour: float = Field(default=0.3, ge=0, le=1)
    p_wrong_shape: float = Field(default=0.2, ge=0, le=1)
    p_wrong_background: float = Field(default=0.0, ge=0, le=1)


class SampleConfig(Strict):
    num_steps: int = Field(default=20, ge=2)
    guidance_scale: float = Field(default=5.0, ge=0)
    eta: float = Field(default=1.0, ge=0)
    batch_size: int = Field(default=64, ge=1)


class ToyPretrainConfig(ToyStage):
    """Stage ``toy_pretrain``: the tiny SD-architecture base model trained on rendered images.

    ``kind: sd15`` trains a UNet with the epsilon objective on SD-1.5's DDPM schedule (``arch``);
    ``kind: sd3`` trains an SD3 transformer with the rectified-flow objective (``transformer``)."""

    world_dir: str = "artifacts/toy/world"
    output_dir: str = "artifacts/toy/base"
    # Outside the DVC output: one folder per configuration (its fingerprint) inside, so that a run
    # killed under `dvc repro` resumes, and a changed configuration starts fresh.
    checkpoint_dir: str = "artifacts/toy/checkpoints/base"
    resume: bool = True  # continue this configuration's checkpoints (false: start over)
    seed: int = 0
    # ~10 minutes at the 0.78-0.8 s/step measured on 2 lightly loaded cores (benchmarks/toy_pretrain.py).
    steps: int = Field(default=640, ge=1)
    batch_size: int = Field(default=64, ge=1)
    # Measured at batch 64, 80 steps: loss 0.52 at 3e-4, 0.27 at 1e-3, 0.19 at 3e-3; 6e-3 diverged.
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    warmup_steps: int = Field(default=30, ge=0)
    lr_schedule: Literal["constant_with_warmup", "cosine"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    # kind sd15: offset noise (diffusers' --noise_offset): noise + offset * N(0, 1) per image and channel.
    # SD-1.5's schedule leaves sqrt(alpha_bar) ~ 0.08 at its first sampling step, so at 32 px the noisy
    # latent's channel means still show the background: without an offset the model reads the background
    # from them instead of from the prompt, and samples from pure noise get a random one.
    noise_offset: float = Field(default=0.0, ge=0)
    checkpoint_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=25, ge=1)
    kind: Literal["sd15", "sd3"] = "sd15"
    arch: UNetArch = UNetArch()  # kind sd15
    transformer: TransformerArch = TransformerArch()  # kind sd3
    # kind sd3: the scheduler's static shift (SD3 uses 3.0 at 1024 px; 1.0 suits 32 px) and the
    # logit-normal time sampling of SD3's training (t = sigmoid(N(mean, std))).
    flow_shift: float = Field(default=1.0, gt=0)
    logit_mean: float = 0.0
    logit_std: float = Field(default=1.0, gt=0)
    captions: CaptionNoise = CaptionNoise()
    sampler: SampleConfig = SampleConfig()
    grid_prompts: int = Field(default=8, ge=1)  # held-out prompts in the sample grid
    eval_prompts: int = Field(default=64, ge=0)  # held-out prompts for the end-of-training reward
    num_threads: int | None = Field(default=None, ge=1)  # torch threads; None keeps torch's default

    @model_validator(mode="after")
    def _offset_needs_ddpm(self) -> "ToyPretrainConfig":
        if self.kind == "sd3" and self.noise_offset:
            raise ValueError(f"noise_offset={self.noise_offset} applies to kind sd15 only (the rectified flow reaches "
                             "pure noise at t = 1, so no image leaks through): set it to 0 for kind sd3")
        return self


class LabelConfig(Strict):
    """Simulated human: Bradley-Terry on the ground-truth reward, ties within a margin."""

    temperature: float = Field(default=0.03, gt=0)
    tie_margin: float = Field(default=0.01, ge=0)


class ToyPrefsConfig(ToyStage):
    """Stage ``toy_prefs``: pairs of base samples labelled by the simulated human (Pick-a-Pic schema)."""

    world_dir: str = "artifacts/toy/world"
    base_dir: str = "artifacts/toy/base"
    output_dir: str = "artifacts/toy/prefs"
    n_train_prompts: int | None = Field(default=1000, ge=1)  # None: every training prompt
    n_validation_prompts: int | None = Field(default=500, ge=1)  # 500 keeps the accuracy's s.e. near 2%
    sampler: SampleConfig = SampleConfig()
    labels: LabelConfig = LabelConfig()
    seed: int = 0
    num_threads: int | None = Field(default=None, ge=1)


class ClipArch(Strict):
    hidden: int = Field(default=64, ge=8)
    vision_layers: int = Field(default=3, ge=1)
    text_layers: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    patch_size: int = Field(default=4, ge=1)
    projection_dim: int = Field(default=64, ge=8)

    @model_validator(mode="after")
    def _check(self) -> "ClipArch":
        if self.hidden % self.heads:
            raise ValueError(f"clip hidden={self.hidden} must be divisible by heads={self.heads}")
        return self


class ToyPickScoreConfig(ToyStage):
    """Stage ``toy_pickscore``: a tiny CLIP trained with the PickScore objective on the toy pairs.

    Like PickScore (a CLIP fine-tuned on preferences), it is first trained contrastively on rendered
    image/caption pairs (``clip_steps``), then on the preference pairs (``pref_steps``).
    """

    world_dir: str = "artifacts/toy/world"
    prefs_dir: str = "artifacts/toy/prefs"
    output_dir: str = "artifacts/toy/pickscore"
    arch: ClipArch = ClipArch()
    seed: int = 0
    clip_steps: int = Field(default=600, ge=0)  # without this phase held-out accuracy fell from 0.769 to 0.715
    clip_batch_size: int = Field(default=128, ge=2)
    clip_lr: float = Field(default=1e-3, gt=0)
    clip_base_share: float = Field(default=0.25, ge=0, lt=1)  # base samples (training pairs) per phase-1 batch
    clip_degrade: float = Field(default=0.75, ge=0, le=1)  # share of degraded renders in phase 1
    clip_noise: float = Field(default=0.6, ge=0)  # max pixel-noise std
    clip_blotch: float = Field(default=0.4, ge=0)  # max std of smooth colour blotches
    # Held-out accuracy measured with 1,000 training pairs: 100 steps at 1e-4 0.697, 300 at 1e-4
    # 0.741, 200 at 3e-4 0.769, 400 at 3e-4 0.752 (training accuracy 0.96: memorising).
    pref_steps: int = Field(default=200, ge=0)
    pref_batch_size: int = Field(default=64, ge=1)
    pref_lr: float = Field(default=3e-4, gt=0)
    pref_mirror: bool = True  # left-right mirrored pairs (captions' left/right swapped) on half the steps
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    image_mean: RGB = (0.5, 0.5, 0.5)
    image_std: RGB = (0.5, 0.5, 0.5)
    num_threads: int | None = Field(default=None, ge=1)
