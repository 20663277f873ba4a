"""The diffusion policy: a Stable Diffusion (SD-1.5 or SDXL style) model behind one small surface.

SD-1.5 and SDXL differ only in :meth:`DiffusionPolicy.encode_prompts` (one vs two text encoders,
pooled embeddings and time ids); the sampler, trainers and stages above it are model-agnostic.
The scheduler is always DDIM configured as in the SPO reference (``leading`` spacing,
``steps_offset=1``, ``set_alpha_to_one=False``), whatever the checkpoint ships.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..config import ModelConfig
from ..errors import InputError
from ..processes.ddim import DDIMProcess
from ..utils import DTYPES
from .latent_map import PixelShuffleLatentMap

log = logging.getLogger(__name__)

DDIM_OVERRIDES = dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False)


class ModelLoadError(InputError, RuntimeError):
    """A model that cannot be loaded; the message names the source and how to fix it."""


@dataclass
class Conditioning:
    """Text conditioning for a batch: conditional and unconditional branches for CFG."""

    cond: torch.Tensor  # (B, L, D) encoder hidden states
    uncond: torch.Tensor  # (B, L, D)
    cond_added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds, time_ids
    uncond_added: dict[str, torch.Tensor] | None = None
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.cond.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> "Conditioning":
        """Rows ``index`` (a gather; repeats allowed), e.g. to align with candidates."""
        idx = torch.as_tensor(index, dtype=torch.long)
        dev = self.cond.device
        pick = lambda d: None if d is None else {k: v[idx.to(v.device)] for k, v in d.items()}  # noqa: E731
        return replace(
            self,
            cond=self.cond[idx.to(dev)],
            uncond=self.uncond[idx.to(dev)],
            cond_added=pick(self.cond_added),
            uncond_added=pick(self.uncond_added),
            prompts=[self.prompts[i] for i in idx.tolist()] if self.prompts else [],
        )

    def to(self, device: torch.device | str) -> "Conditioning":
        mv = lambda d: None if d is None else {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return replace(self, cond=self.cond.to(device), uncond=self.uncond.to(device),
                       cond_added=mv(self.cond_added), uncond_added=mv(self.uncond_added))


class DiffusionPolicy:
    """UNet + scheduler + latent codec + text encoders, with guided noise prediction."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler,
        vae,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        kind: str = "sd15",
        resolution: int | None = None,
    ):
        if kind not in ("sd15", "sdxl"):
            raise ValueError(f"unknown model kind '{kind}': use 'sd15' or 'sdxl'")
        if kind == "sdxl" and (text_encoder_2 is None or tokenizer_2 is None):
            raise ModelLoadError("an SDXL model needs text_encoder_2 and tokenizer_2 (check model.kind)")
        self.kind = kind
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.scheduler = DDIMScheduler.from_config(scheduler.config, **DDIM_OVERRIDES)
        self.process = DDIMProcess(self.scheduler)  # what the rollouts step with
        for m in self.frozen_modules():
            m.requires_grad_(False)
            m.eval()
        self.unet.requires_grad_(False)
        # The module that runs the UNet forward: a DDP-wrapped UNet while training under accelerate.
        self.forward_denoiser = unet
        sf = self.vae_scale_factor
        self.resolution = resolution or int(self.unet.config.sample_size) * sf
        if self.resolution % sf:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE scale factor {sf}")

    # ---------------------------------------------------------------- properties
    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the LoRA adapts and the trainer optimises."""
        return self.unet

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        if isinstance(self.vae, PixelShuffleLatentMap):
            return int(self.vae.config.factor)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.resolution // self.vae_scale_factor
        return (int(self.unet.config.in_channels), s, s)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def vae_upcast(self) -> bool:
        """Whether the VAE must run in float32 when the model is fp16: SDXL's own VAE overflows to
        NaN (black images) in fp16 and says so with ``force_upcast``; the fp16-fix VAE clears the
        flag. As in diffusers' SDXL pipeline; SD-1.5's pipeline never upcasts (its VAE configs leave
        the flag at the default)."""
        return self.kind == "sdxl" and bool(getattr(self.vae.config, "force_upcast", False))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DiffusionPolicy":
        for m in [self.unet, *self.frozen_modules()]:
            mdt = torch.float32 if (m is self.vae and dtype == torch.float16 and self.vae_upcast) else dtype
            m.to(device=device, dtype=mdt)
        return self

    # ---------------------------------------------------------------- text
    def _tokenize(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompts = list(prompts)
        if self.kind == "sd15":
            cond = self.text_encoder(self._tokenize(self.tokenizer, prompts))[0]
            uncond = self.text_encoder(self._tokenize(self.tokenizer, [""]))[0].expand_as(cond)
            return Conditioning(cond=cond, uncond=uncond.contiguous(), prompts=prompts)
        # SDXL: penultimate hidden states of both encoders, concatenated; pooled from encoder 2.
        h1 = self.text_encoder(self._tokenize(self.tokenizer, prompts), output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoder_2(self._tokenize(self.tokenizer_2, prompts), output_hidden_states=True)
        cond = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        pooled = out2.text_embeds
        res = self.resolution
        # (original size, crop top-left, target size) as in SDXL's micro-conditioning.
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=self.device, dtype=cond.dtype).repeat(len(prompts), 1)
        # SDXL uses zero embeddings for the unconditional branch (force_zeros_for_empty_prompt).
        return Conditioning(
            cond=cond,
            uncond=torch.zeros_like(cond),
            cond_added={"text_embeds": pooled, "time_ids": time_ids},
            uncond_added={"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids},
            prompts=prompts,
        )

    # ---------------------------------------------------------------- UNet
    def _unet(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, added: dict | None) -> torch.Tensor:
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        # float32 from here on (fp16/bf16 UNets): the CFG combination and every schedule term.
        out = self.forward_denoiser(x, t, encoder_hidden_states=hidden, **kwargs).sample.float()
        if self.scheduler.config.prediction_type == "v_prediction":
            a = self.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1).float()
            out = a.sqrt() * out + (1 - a).sqrt() * x.float()
        elif self.scheduler.config.prediction_type != "epsilon":
            raise ModelLoadError(f"prediction_type '{self.scheduler.config.prediction_type}' is not supported")
        return out

    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """CFG-combined noise prediction; one batched UNet call (counts as one guided evaluation).

        ``t`` is a scalar or a (B,) tensor of integer timesteps. Gradients flow if enabled. The
        result is float32 whatever the UNet's dtype (see :func:`spo_core.processes.common.work_dtype`).
        """
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).long()
        if t.ndim == 0:
            t = t.expand(b)
        if guidance_scale == 1.0:
            return self._unet(x, t, cond.cond, cond.cond_added)
        hidden = torch.cat([cond.uncond, cond.cond])
        added = None
        if cond.cond_added is not None:
            added = {k: torch.cat([cond.uncond_added[k], cond.cond_added[k]]) for k in cond.cond_added}
        eps_u, eps_c = self._unet(torch.cat([x, x]), torch.cat([t, t]), hidden, added).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """The network output the process steps with (for a UNet policy: :meth:`guided_eps`)."""
        return self.guided_eps(x, t, cond, guidance_scale)

    def x0_from_eps(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The x0 estimate, computed in float32 (or float64) whatever the latents' dtype."""
        return self.process.x0(x, t, eps)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.process.add_noise(x0, noise, t)

    # ---------------------------------------------------------------- latents <-> images
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W), float32."""
        if isinstance(self.vae, PixelShuffleLatentMap):
            return self.vae.decode_latents(latents).float()
        vae_dtype = next(self.vae.parameters()).dtype
        img = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
        return ((img.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> latents (the posterior mean, scaled)."""
        if isinstance(self.vae, PixelShuffleLatentMap):
            return self.vae.encode_images(images.to(self.dtype))
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(vae_dtype) * 2 - 1).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).to(self.dtype)

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write a diffusers pipeline directory (``model_index.json`` + one folder per component)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        comps = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "tokenizer": self.tokenizer, "scheduler": self.scheduler}
        if self.kind == "sdxl":
            comps.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        index = {"_class_name": "StableDiffusionXLPipeline" if self.kind == "sdxl" else "StableDiffusionPipeline",
                 "_diffusers_version": __import__("diffusers").__version__}
        for name, comp in comps.items():
            comp.save_pretrained(str(out / name))
            lib = type(comp).__module__.split(".")[0]
            if isinstance(comp, PixelShuffleLatentMap):
                lib = "spo_core"
            index[name] = [lib, type(comp).__name__]
        if self.kind == "sd15":
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        else:
            index.update(force_zeros_for_empty_prompt=True)
        (out / "model_index.json").write_text(json.dumps(index, indent=2))


# -------------------------------------------------------------------- loading


def _is_local(src: str) -> bool:
    return Path(src).expanduser().exists()


def _looks_like_path(src: str) -> bool:
    return src.startswith(("/", "./", "../", "~")) or src.count("/") > 1 or "\\" in src


def _offline_hint(src: str, what: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {what} from '{src}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        f"  If this is a hub id and this machine is offline or lacks the weights, download it elsewhere "
        f"(e.g. `huggingface-cli download {src} --local-dir DIR`) and pass the local directory instead "
        f"(model.pretrained=DIR)."
    )


def _load_vae(src: str, subfolder: str | None, kw: dict):
    cfg_path = Path(src) / (subfolder or "") / "config.json"
    if _is_local(src) and cfg_path.exists():
        if json.loads(cfg_path.read_text()).get("_class_name") == "PixelShuffleLatentMap":
            return PixelShuffleLatentMap.from_pretrained(src, subfolder=subfolder)
    return AutoencoderKL.from_pretrained(src, subfolder=subfolder, **kw)


PIPELINE_KINDS = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                  "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def pipeline_kind(pipeline_dir: str | Path) -> str:
    """The model kind of a local diffusers pipeline directory, from its ``model_index.json``."""
    index = Path(pipeline_dir) / "model_index.json"
    if not index.exists():
        raise ModelLoadError(f"'{pipeline_dir}' is not a diffusers pipeline directory (no model_index.json)")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINE_KINDS:
        raise ModelLoadError(f"'{pipeline_dir}' holds a {name}, not one of {', '.join(PIPELINE_KINDS)}")
    return PIPELINE_KINDS[name]


def load_policy(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """Load a policy from ``cfg.pretrained``: a hub id, a local pipeline directory, or ``tiny:<kind>``.

    A :class:`DiffusionPolicy` for the UNet kinds, a :class:`spo_core.models.flow_policy.FlowPolicy`
    for ``sd3`` and ``flux``; both offer what the rollouts and trainers use."""
    src = cfg.pretrained
    dtype = DTYPES[cfg.dtype]
    if src.startswith("tiny:") and (src.split(":", 1)[1] or cfg.kind) != cfg.kind:
        raise ModelLoadError(f"model.pretrained={src} does not match model.kind={cfg.kind}")
    if cfg.kind in ("sd3", "flux"):
        return _load_flow_policy(cfg, device, dtype)
    _check_options(cfg, ("max_sequence_length", "true_cfg_scale"), "sd3 and flux")
    if src.startswith("tiny:"):
        from .tiny import build_tiny_components

        policy = DiffusionPolicy(kind=cfg.kind, resolution=cfg.resolution, **build_tiny_components(cfg.kind))
        return policy.to(device, dtype)
    src, local = _locate(cfg)
    kw = dict(revision=cfg.revision, local_files_only=cfg.local_files_only or local)
    parts: dict = {}
    try:
        parts["unet"] = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        parts["scheduler"] = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        parts["text_encoder"] = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        if cfg.kind == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw)
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
    except ModelLoadError:
        raise
    except Exception as exc:  # hub/offline/corrupt errors come in many types
        raise _offline_hint(src, "the diffusion model", exc) from exc
    try:
        if cfg.vae:
            vae_local = _is_local(cfg.vae)
            parts["vae"] = _load_vae(cfg.vae, None, dict(local_files_only=cfg.local_files_only or vae_local))
        else:
            parts["vae"] = _load_vae(src, "vae", kw)
    except Exception as exc:
        raise _offline_hint(cfg.vae or src, "the VAE", exc) from exc
    policy = DiffusionPolicy(kind=cfg.kind, resolution=cfg.resolution, **parts)
    policy.to(device, dtype)
    if dtype == torch.float16 and policy.vae_upcast:
        log.info("the VAE asks for float32 (force_upcast): decoding in float32; an fp16-fix VAE "
                 "(model.vae=madebyollin/sdxl-vae-fp16-fix) decodes faster in fp16")
    log.info("loaded %s policy from %s (%d UNet parameters)", cfg.kind, src, sum(p.numel() for p in policy.unet.parameters()))
    return policy


def _check_options(cfg: ModelConfig, names: tuple[str, ...], kinds: str) -> None:
    set_ = [n for n in names if getattr(cfg, n) != type(cfg).model_fields[n].default]
    if set_:
        raise ModelLoadError(f"model.{set_[0]} applies to {kinds} models only; model.kind is {cfg.kind}: remove it")


def _locate(cfg: ModelConfig) -> tuple[str, bool]:
    """(source, is local) for ``cfg.pretrained``, checked: a missing path fails here with the fix."""
    src = cfg.pretrained
    local = _is_local(src)
    if not local and _looks_like_path(src):  # not a hub id (owner/name): a path that does not exist
        raise ModelLoadError(f"model path '{src}' does not exist: check the path (relative paths start at the working "
                             "directory), or give a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    if local:
        src = str(Path(src).expanduser())
        if not (Path(src) / "model_index.json").exists() and not any((Path(src) / d).is_dir()
                                                                     for d in ("unet", "transformer")):
            raise ModelLoadError(f"'{src}' is not a diffusers pipeline directory (no model_index.json, unet/ or "
                                 f"transformer/)")
    return src, local


def _load_flow_policy(cfg: ModelConfig, device, dtype):
    from .flow_policy import build_flow_policy

    if cfg.vae:
        raise ModelLoadError("model.vae applies to sd15 and sdxl models only: remove it (SD3 and FLUX load their own)")
    src, local = (cfg.pretrained, False) if cfg.pretrained.startswith("tiny:") else _locate(cfg)
    kw = dict(revision=cfg.revision, local_files_only=cfg.local_files_only or local)
    try:
        policy = build_flow_policy(src, cfg.kind, kw, resolution=cfg.resolution,
                                   max_sequence_length=cfg.max_sequence_length, true_cfg_scale=cfg.true_cfg_scale)
    except ModelLoadError:
        raise
    except Exception as exc:  # hub/offline/corrupt errors come in many types
        raise _offline_hint(src, "the flow model", exc) from exc
    policy.to(device, dtype)
    log.info("loaded %s policy from %s (%d transformer parameters)", cfg.kind, src,
             sum(p.numel() for p in policy.transformer.parameters()))
    return policy
