"""Typed, validated configuration loaded from YAML profiles.

A profile is a YAML file (``spo_core/profiles/<name>.yaml`` or any path). Values can be overridden
with dotted ``key=value`` strings (``sampler.k=8``). Unknown keys and bad values raise
:class:`ConfigError` naming the offending key and what is allowed.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from .errors import InputError

PROFILE_DIR = Path(__file__).parent / "profiles"


class ConfigError(InputError, ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


class BudgetError(ConfigError):
    """A global budget (prompts per round, a batch) that the processes of a run cannot share equally."""


class Strict(BaseModel):
    # inf and nan are never meaningful settings (an lr of inf passed validation before).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # Operational fields: where and how a stage runs (device, threads, processes), where it writes and
    # how often it checkpoints or logs. They never change its results, so DVC must not rerun it when
    # they change: dvc.yaml's `params:` lists every other field (result_keys; tests/test_config.py
    # checks dvc.yaml against it). A class adds its own with `OPERATIONAL = Strict.OPERATIONAL | {...}`.
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({
        "device", "num_threads", "num_workers", "launch", "output_dir", "checkpoint_dir", "checkpoint_every",
        "keep_checkpoints", "log_every", "resume",
    })

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic reads `true` as 1 for a number; in a config file it is always a slip.
        if isinstance(v, bool) and info.field_name in cls.model_fields:
            allowed = _flat_types(cls.model_fields[info.field_name].annotation)
            if bool not in allowed and allowed & {int, float}:
                raise ValueError("a number is needed, not true/false")
        return v


def _flat_types(tp: Any) -> set:
    args = typing.get_args(tp)
    if not args:
        return {tp}
    return set().union(*(_flat_types(a) for a in args))


def _section_types(tp: Any) -> list[type[Strict]]:
    """The config classes a field holds directly (``X`` or ``X | None``; not inside a list or dict)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _section_types(a)]
    return [tp] if isinstance(tp, type) and issubclass(tp, Strict) else []


def _has_operational(cls: type[Strict]) -> bool:
    return any(name in cls.OPERATIONAL or any(_has_operational(s) for s in _section_types(f.annotation))
               for name, f in cls.model_fields.items())


def result_keys(cls: type[Strict], prefix: str = "") -> list[str]:
    """The dotted keys of ``cls`` that change a stage's results: every field but the operational ones,
    a whole sub-section where none of its fields is operational (what dvc.yaml's ``params:`` lists)."""
    keys = []
    for name, field in cls.model_fields.items():
        if name in cls.OPERATIONAL:
            continue
        sections = _section_types(field.annotation)
        if not any(_has_operational(s) for s in sections):
            keys.append(prefix + name)
        elif len(sections) == 1 and type(None) not in _flat_types(field.annotation):
            keys += result_keys(sections[0], f"{prefix}{name}.")
        else:  # an optional section may be null in params.yaml: DVC could not find its keys
            raise TypeError(f"{cls.__name__}.{name}: an optional section with operational fields cannot be listed "
                            "key by key in dvc.yaml; make the section required or move those fields out")
    return keys


class ModelConfig(Strict):
    """The base diffusion model (the policy's frozen backbone and the reference)."""

    # A hub id, a local diffusers pipeline directory, or "tiny:<kind>" (random tiny config).
    pretrained: str
    # sd15 / sdxl: UNet models on the DDIM process; sd3 (SD3, SD3.5) / flux (FLUX.1): transformers on
    # the flow-matching process (sampling.eta is then the SDE's noise level).
    kind: Literal["sd15", "sdxl", "sd3", "flux"] = "sd15"
    vae: str | None = None  # optional separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix)
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    resolution: int | None = Field(default=None, gt=0)  # None: the denoiser's native sample size
    local_files_only: bool = False
    # Flow models: T5's sequence length (None: the pipeline's default, 256 for SD3, 512 for FLUX.1-dev)
    # and FLUX's true CFG against the empty prompt (1: off; FLUX.1-dev's guidance is its embedding).
    max_sequence_length: int | None = Field(default=None, gt=0)
    true_cfg_scale: float = Field(default=1.0, ge=1.0)

    OPERATIONAL = Strict.OPERATIONAL | {"local_files_only"}


class SamplingConfig(Strict):
    """Plain DDIM sampling (the paper's protocol: 20 steps, CFG 5.0, eta 1)."""

    num_steps: int = Field(default=20, ge=2)
    guidance_scale: float = Field(default=5.0, ge=0.0)
    eta: float = Field(default=1.0, ge=0.0)


class RolloutConfig(SamplingConfig):
    """Sampling inside an online trainer, whose candidates the preference model scores."""

    # Images decoded and scored per call: bounds the decoder's transient memory (SD-1.5 at 512 px
    # decodes about 1 GiB of activations per image in fp16).
    decode_batch_size: int = Field(default=64, ge=1)

    OPERATIONAL = SamplingConfig.OPERATIONAL | {"decode_batch_size"}

    @field_validator("eta")
    @classmethod
    def _noisy(cls, v: float) -> float:
        # A trainer's log-probabilities need a noisy step: eta = 0 (DDIM's deterministic step, the
        # flow ODE) has std 0, and the loss would be NaN.
        if v <= 0:
            raise ValueError("sampler.eta = 0 samples without noise (DDIM's deterministic step, the flow ODE): its "
                             "steps have no log-probability to train on; use eta > 0 (DDIM: 1.0, the flow SDE: 0.7)")
        return v


class SamplerConfig(RolloutConfig):
    """The SPO step-wise branching sampler."""

    # Branch (k candidates per step) at every step whose next timestep is below kappa: with 20 steps,
    # kappa=750 branches from t=751 (step index 4) as the reference code does; 1000 branches everywhere.
    kappa: int = Field(default=750, ge=0, le=1000)
    k: int = Field(default=4, ge=2)
    # Solo steps after each branching step, as the reference's num_inner_step: 0 is single-step SPO;
    # j > 0 is the multi-step (SDXL) variant with segments of j + 1 transitions (SDXL: j = 3).
    inner_steps: int = Field(default=0, ge=0)
    threshold: float = Field(default=0.3, ge=0.0, lt=1.0)
    resampler: Literal["random", "win", "lose", "none"] = "random"
    pair: Literal["best_worst", "random"] = "best_worst"
    # How a candidate is judged. 0 (the paper): the scorer sees the one-call x0 estimate at the
    # candidate's own timestep. n > 0: it sees a deterministic (eta 0) continuation to x_0 in at most
    # n steps over the grid's remaining times, scored at t = 0; sharper labels at the early steps
    # where outcomes diverge, for about n - 1 more UNet calls per candidate and step.
    lookahead: int = Field(default=0, ge=0)


class LoraConfig(Strict):
    rank: int = Field(default=4, ge=1)
    alpha: float | None = None  # None: alpha = rank
    init: Literal["gaussian", "default"] = "gaussian"
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class OptimConfig(Strict):
    # adamw8bit: bitsandbytes' 8-bit AdamW (CUDA only), a quarter of AdamW's state memory.
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = Field(default=6e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(default=1e-4, ge=0)
    adam_eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)  # None disables clipping


class SPOLossConfig(Strict):
    beta: float = Field(default=10.0, gt=0)
    eps: float = Field(default=0.1, gt=0, lt=1)


class TrainConfig(Strict):
    """The training budget. Every number is global, the same whatever the number of processes
    (``launch.num_processes``): N processes split each round's prompts and each micro-batch, and
    train what one process trains."""

    rounds: int = Field(default=10, ge=1)
    # Prompts sampled per round, over all processes (a multiple of the number of processes).
    prompts_per_round: int = Field(default=10, ge=1)
    # Items per micro-batch, over all processes (each process takes its share). Fewer GPUs than the
    # profile assumes need more memory per GPU: then divide it and multiply gradient_accumulation_steps
    # by the same factor (the same items per optimiser step).
    train_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    epochs_per_round: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=1, ge=1)  # rounds
    keep_checkpoints: int = Field(default=2, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # Recompute the UNet's activations in the backward pass: far less memory, about a third more time.
    gradient_checkpointing: bool = False
    allow_tf32: bool = True  # TF32 matmuls and convolutions on Ampere and newer GPUs
    seed: int = 0
    output_dir: str = "artifacts/spo"
    save_merged: bool = False
    export_kohya: bool = True
    resume: bool = False  # continue from the last checkpoint in output_dir/checkpoints
    # A LoRA weight beyond this means training diverged (trained SPO LoRAs stay below 1; lr=100 gives
    # 256): the round is not checkpointed and training stops. None turns the check off.
    max_lora_weight: float | None = Field(default=20.0, gt=0)

    # Memory and safety switches: gradient checkpointing recomputes the same activations; the weight
    # check only stops a diverged run.
    OPERATIONAL = Strict.OPERATIONAL | {"gradient_checkpointing", "max_lora_weight"}


class ScorerConfig(Strict):
    """Which preference model scores candidates during SPO sampling (see spo_core.scorers).

    No default: a forgotten name must not quietly train towards some other objective."""

    name: str
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class PromptsConfig(Strict):
    """Where training prompts come from (see spo_core.data.prompts)."""

    source: Literal["list", "text", "spo_json", "partiprompts", "toy", "pickapic"] = "list"
    path: str | None = None
    prompts: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1)
    category: str | None = None  # PartiPrompts category filter

    @model_validator(mode="after")
    def _check(self) -> "PromptsConfig":
        if self.source == "list" and not self.prompts:
            raise ValueError("prompts.source is 'list' but prompts.prompts is empty: give a list of prompts or another source")
        if self.source in {"text", "spo_json", "partiprompts"} and not self.path:
            raise ValueError(f"prompts.source '{self.source}' needs prompts.path (a file)")
        return self


class MonitorConfig(Strict):
    """Optional per-round evaluation (e.g. the toy world's ground-truth reward) for training curves."""

    scorer: ScorerConfig | None = None
    prompts: PromptsConfig | None = None
    num_prompts: int = Field(default=32, ge=1)
    every: int = Field(default=5, ge=1)  # rounds
    seed: int = 1234


class LaunchConfig(Strict):
    """How a stage's command (``python -m spo_core.stages.<stage>``, what DVC runs) starts it: in its
    own process, or with ``num_processes`` > 1 under ``accelerate launch`` (one process per GPU, or
    gloo processes on CPUs). Operational: budgets are global, so the result does not depend on it.
    Mixed precision is the stage's own setting (``train.mixed_precision`` / ``mixed_precision``)."""

    num_processes: int = Field(default=1, ge=1)
    main_process_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port (stages may run side by side)


def check_divisible(value: int, key: str, processes: int) -> None:
    """A global budget that the processes cannot share equally is refused, naming the fix."""
    if value % processes:
        near = " or ".join(str(v) for v in sorted({value // processes * processes, -(-value // processes) * processes} - {0}))
        raise ValueError(f"{key}={value} is a global budget that {processes} processes cannot share equally: set it to "
                         f"a multiple of {processes} ({near}), or launch.num_processes to a divisor of {value}")


class TrainerBaseConfig(Strict):
    """What every LoRA trainer (SPO and its baselines) shares."""

    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scorer: ScorerConfig | None = None  # required by the online trainers (SPO, D3PO, DDPO)
    prompts: PromptsConfig
    monitor: MonitorConfig = MonitorConfig()
    device: str = "auto"
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _budget_shared(self) -> "TrainerBaseConfig":
        check_divisible(self.train.prompts_per_round, "train.prompts_per_round", self.launch.num_processes)
        return self


class SPOConfig(TrainerBaseConfig):
    """Everything the SPO trainer needs."""

    scorer: ScorerConfig  # the step-aware preference model (e.g. {name: step_aware, path: artifacts/pm/aware})
    sampler: SamplerConfig = SamplerConfig()
    loss: SPOLossConfig = SPOLossConfig()

    @field_validator("sampler")
    @classmethod
    def _sampler_ok(cls, v: SamplerConfig) -> SamplerConfig:
        if v.inner_steps >= v.num_steps:
            raise ValueError(f"sampler.inner_steps={v.inner_steps} must be below sampler.num_steps={v.num_steps} "
                             f"(it counts the solo steps after each branching step)")
        return v


class D3POConfig(TrainerBaseConfig):
    """D3PO: two full trajectories from one x_T; the final-image label applies to every step."""

    scorer: ScorerConfig
    sampler: RolloutConfig = RolloutConfig()
    loss: SPOLossConfig = SPOLossConfig(beta=0.1)
    threshold: float = Field(default=0.0, ge=0.0, lt=1.0)  # same pair filter as SPO; 0 keeps all


class DDPOConfig(TrainerBaseConfig):
    """DDPO: PPO on full trajectories with per-prompt normalised rewards."""

    scorer: ScorerConfig
    sampler: RolloutConfig = RolloutConfig()
    samples_per_prompt: int = Field(default=4, ge=2)
    clip_range: float = Field(default=1e-4, gt=0)
    adv_clip: float = Field(default=5.0, gt=0)


class GRPOConfig(DDPOConfig):
    """Flow-GRPO: groups of ``samples_per_prompt`` images per prompt from the SDE sampler (the flow
    process's noise level is ``sampler.eta``), group-centred rewards over the group's or the round's
    standard deviation, a clipped ratio and a KL penalty to the reference on the trained steps."""

    sampler: RolloutConfig = RolloutConfig(num_steps=10, guidance_scale=4.5, eta=0.7)
    samples_per_prompt: int = Field(default=24, ge=2)
    kl_beta: float = Field(default=0.01, ge=0)
    global_std: bool = True
    timestep_fraction: float = Field(default=0.99, gt=0, le=1)


class DiffusionDPOConfig(TrainerBaseConfig):
    """Diffusion-DPO: offline pairs from a Pick-a-Pic-schema preference dataset (ties dropped).

    ``train.prompts_per_round`` is the number of pairs per round (over all processes); ``prompts``/``scorer`` are unused
    for training but ``prompts`` feeds the optional monitor.
    """

    dataset: str  # parquet file or folder of shards
    beta: float = Field(default=5000.0, gt=0)
    sampler: SamplingConfig = SamplingConfig()  # for the monitor only


# ----------------------------------------------------------------------------------------------
# Loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if not loc:  # a check across keys: its message names them (the whole section is no help)
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{loc}': remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  - missing key '{loc}': add it to the section")
        else:
            lines.append(f"  - {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 scalars, as DVC reads and writes params.yaml (ruamel): PyYAML's YAML 1.1 reads `no`,
    `off`, `yes`, `on` as booleans and `1e-08` as text, and `dvc exp run -S` rewrites
    `mixed_precision: 'no'` without its quotes."""


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != _BOOL] for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse a profile, params.yaml or an override value (YAML 1.2 scalars, as DVC)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def read_profile(profile: str | Path) -> dict[str, Any]:
    """Return the raw mapping of a profile name or a YAML path."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown profile '{profile}': choose one of {available_profiles()} or pass a YAML file path"
            )
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder: give a YAML file or a profile name")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not a text file (not UTF-8): give a YAML file or a profile name") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; the value is parsed as YAML (numbers, lists, null)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node = nxt
        try:
            node[parts[-1]] = load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({str(exc).splitlines()[0]}); quote "
                              f"text values, e.g. {key}='\"...\"'") from None
    return data


def validate_section(cls: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_section(profile: str | Path, section: str, cls: type[BaseModel], overrides: list[str] | None = None) -> Any:
    """Load one top-level section of a profile (e.g. ``train_spo``) into ``cls``.

    Overrides are relative to the section (``sampler.k=8``).
    """
    raw = read_profile(profile)
    if section not in raw:
        raise ConfigError(f"profile '{profile}' has no section '{section}'; it has {sorted(raw)}")
    data = apply_overrides(raw[section] or {}, overrides)
    return validate_section(cls, data, f"profile '{profile}' section '{section}'")


def load_spo_config(profile: str | Path, overrides: list[str] | None = None) -> SPOConfig:
    return load_section(profile, "train_spo", SPOConfig, overrides)
