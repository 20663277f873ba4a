"""The flow-matching policy: SD3 / SD3.5 (``sd3``) and FLUX.1 (``flux``) behind one small surface.

Like :class:`spo_core.models.diffusion.DiffusionPolicy` for the UNet models, it hides what differs
between the two families: their text encoders (SD3: CLIP-L + CLIP-G + T5, the CLIP states padded to
T5's width and joined along the sequence, pooled CLIP-L + CLIP-G; FLUX: T5 states, pooled CLIP-L),
FLUX's packed 2x2 latent tokens with their position ids, its distilled guidance embedding, and the
two VAEs' shift and scaling factors. The rollouts see latents (B, C, H, W), times t in [0, 1]
(diffusers' sigma; 1 is pure noise) and the velocity ``v = eps - x0`` in float32.

Guidance: SD3 uses classifier-free guidance (``guidance_scale``, the negative prompt ""). FLUX.1-dev
takes ``guidance_scale`` as the guidance embedding and runs one transformer call; true CFG against
the empty prompt is optional (``true_cfg_scale`` > 1, a second call), as in diffusers' FluxPipeline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..processes.flow import FlowProcess
from .diffusion import Conditioning, ModelLoadError, _load_vae
from .latent_map import PixelShuffleLatentMap

log = logging.getLogger(__name__)

FLOW_KINDS = ("sd3", "flux")
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# The T5 sequence length of the published pipelines' defaults.
DEFAULT_T5_LENGTH = {"sd3": 256, "flux": 512}
# model_index.json key of the T5 length a saved pipeline was trained with (the toy flow base: SD3 without
# T5, whose zero T5 tokens diffusers sizes by max_sequence_length); loading uses it unless told otherwise.
T5_LENGTH_KEY = "spo_max_sequence_length"


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX tokens: (B, C, H, W) -> (B, H/2 * W/2, 4C), each token a 2x2 patch (diffusers' layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of height h and width w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX's rotary position ids of the packed tokens: (row, column) of each 2x2 patch, first axis 0."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowPolicy:
    """Transformer + flow-matching scheduler + VAE + text encoders, with a guided velocity."""

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, kind: str = "sd3", resolution: int | None = None,
                 max_sequence_length: int | None = None, true_cfg_scale: float = 1.0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if kind not in FLOW_KINDS:
            raise ValueError(f"unknown flow model kind '{kind}': use 'sd3' or 'flux'")
        self.kind = kind
        self.transformer = transformer
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3  # SD3's T5; None: zeros, as diffusers
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.process = FlowProcess(self.sigmas)  # what the rollouts step with
        self.max_sequence_length = max_sequence_length or DEFAULT_T5_LENGTH[kind]
        self.true_cfg_scale = float(true_cfg_scale)
        for m in self.frozen_modules():
            m.requires_grad_(False)
            m.eval()
        self.transformer.requires_grad_(False)
        self.forward_denoiser = transformer  # a DDP-wrapped transformer while training under accelerate
        sf, unit = self.vae_scale_factor, self.vae_scale_factor * self.patch
        native = int(getattr(transformer.config, "sample_size", 0) or 64) * (sf if kind == "sd3" else sf * 2)
        self.resolution = resolution or native
        if self.resolution % unit:
            raise ValueError(f"resolution {self.resolution} is not a multiple of {unit} (VAE factor x patch size)")

    # ---------------------------------------------------------------- properties
    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the LoRA adapts."""
        return self.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        if isinstance(self.vae, PixelShuffleLatentMap):
            return int(self.vae.config.factor)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def patch(self) -> int:
        """Latent pixels per token side: SD3's patch size, FLUX's 2x2 packing."""
        return int(self.transformer.config.patch_size) if self.kind == "sd3" else 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.resolution // self.vae_scale_factor
        if isinstance(self.vae, PixelShuffleLatentMap):
            return (self.vae.latent_channels, s, s)
        return (int(self.vae.config.latent_channels), s, s)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FlowPolicy":
        for m in [self.transformer, *self.frozen_modules()]:
            m.to(device=device, dtype=dtype)
        return self

    # ---------------------------------------------------------------- time grid
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The sampling grid t_0 = 1 > ... > t_N = 0 (N + 1 values, float32) of the published pipelines:
        SD3 shifts a uniform grid by its static shift; FLUX by a shift that grows with the token count."""
        kw = {}
        if self.scheduler.config.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c, h, w = self.latent_shape
            tokens = (h // self.patch) * (w // self.patch)
            cfg = self.scheduler.config
            kw = dict(mu=calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                                         cfg.max_shift),
                      sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
            self.scheduler.set_timesteps(device="cpu", **kw)
        else:
            self.scheduler.set_timesteps(num_steps, device="cpu")
        return self.scheduler.sigmas.float().clone()

    # ---------------------------------------------------------------- text
    def _tokens(self, tokenizer, prompts: list[str], length: int) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def _t5(self, encoder, tokenizer, prompts: list[str], width: int) -> torch.Tensor:
        if encoder is None:
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device, dtype=self.dtype)
        return encoder(self._tokens(tokenizer, prompts, self.max_sequence_length))[0]

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states, pooled embedding) of ``prompts``; gradients flow if enabled (toy pretraining)."""
        if self.kind == "flux":
            ids = self._tokens(self.tokenizer, prompts, self.tokenizer.model_max_length)
            pooled = self.text_encoder(ids).pooler_output
            width = self.transformer.config.joint_attention_dim
            hidden = self._t5(self.text_encoder_2, self.tokenizer_2, prompts, width)
            return hidden, pooled
        states, pooled = [], []
        for enc, tok in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)):
            out = enc(self._tokens(tok, prompts, tok.model_max_length), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        t5 = self._t5(self.text_encoder_3, self.tokenizer_3, prompts, self.transformer.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Both branches: the prompts and the empty negative prompt (SD3's CFG, FLUX's optional true CFG)."""
        prompts = list(prompts)
        hidden, pooled = self.encode_text(prompts)
        u_hidden, u_pooled = self.encode_text([""])
        return Conditioning(cond=hidden, uncond=u_hidden.expand_as(hidden).contiguous(),
                            cond_added={"pooled_projections": pooled},
                            uncond_added={"pooled_projections": u_pooled.expand_as(pooled).contiguous()},
                            prompts=prompts)

    # ---------------------------------------------------------------- transformer
    def velocity(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | None = None) -> torch.Tensor:
        """One transformer call (no CFG): the velocity at latents x, times t (B,) in [0, 1], float32."""
        x = x.to(self.dtype)
        if self.kind == "sd3":  # SD3 takes t x 1000 (diffusers' timesteps)
            out = self.forward_denoiser(hidden_states=x, timestep=t * 1000, encoder_hidden_states=hidden,
                                           pooled_projections=pooled, return_dict=False)[0]
            return out.float()
        h, w = x.shape[-2:]
        g = None
        if self.transformer.config.guidance_embeds:
            g = torch.full((x.shape[0],), float(guidance), device=x.device, dtype=torch.float32)
        out = self.forward_denoiser(hidden_states=pack_latents(x), timestep=t.to(x.dtype), guidance=g,
                                       pooled_projections=pooled, encoder_hidden_states=hidden,
                                       txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype),
                                       img_ids=latent_image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w).float()

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        guidance_scale: float) -> torch.Tensor:
        """The guided velocity at latents x and times t (a scalar or (B,) in [0, 1]), float32; gradients
        flow if enabled. SD3: CFG when ``guidance_scale`` > 1, one batched call. FLUX: the guidance
        embedding, and true CFG when ``true_cfg_scale`` > 1."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(b)
        pooled, u_pooled = cond.cond_added["pooled_projections"], cond.uncond_added["pooled_projections"]
        if self.kind == "flux":
            v = self.velocity(x, t, cond.cond, pooled, guidance_scale)
            if self.true_cfg_scale > 1:
                v_u = self.velocity(x, t, cond.uncond, u_pooled, guidance_scale)
                v = v_u + self.true_cfg_scale * (v - v_u)
            return v
        if guidance_scale <= 1.0:
            return self.velocity(x, t, cond.cond, pooled, None)
        v_u, v_c = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond.uncond, cond.cond]),
                                  torch.cat([u_pooled, pooled]), None).chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """The network output the process steps with (for a flow policy: :meth:`guided_velocity`)."""
        return self.guided_velocity(x, t, cond, guidance_scale)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow forward process ``(1 - t) x0 + t eps``."""
        return self.process.add_noise(x0, noise, t)

    # ---------------------------------------------------------------- latents <-> images
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W), float32 (un-scaled, then un-shifted, as diffusers)."""
        if isinstance(self.vae, PixelShuffleLatentMap):
            return self.vae.decode_latents(latents.float()).float()
        vae_dtype = next(self.vae.parameters()).dtype
        cfg = self.vae.config
        z = latents.to(vae_dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents: the posterior mean, shifted and scaled."""
        if isinstance(self.vae, PixelShuffleLatentMap):
            return self.vae.encode_images(images.float()).to(self.dtype)
        vae_dtype = next(self.vae.parameters()).dtype
        cfg = self.vae.config
        mean = self.vae.encode(images.to(vae_dtype) * 2 - 1).latent_dist.mean
        return ((mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).to(self.dtype)

    # ---------------------------------------------------------------- saving
    def components(self) -> dict:
        comps = {"transformer": self.transformer, "scheduler": self.scheduler, "vae": self.vae,
                 "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                 "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}
        if self.kind == "sd3":
            comps.update(text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
        return comps

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write a diffusers pipeline directory that ``StableDiffusion3Pipeline`` / ``FluxPipeline`` load."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": PIPELINES[self.kind], "_diffusers_version": __import__("diffusers").__version__}
        for name, comp in self.components().items():
            if comp is None:
                index[name] = [None, None]
                continue
            comp.save_pretrained(str(out / name))
            index[name] = [type(comp).__module__.split(".")[0], type(comp).__name__]
        index.update(image_encoder=[None, None], feature_extractor=[None, None])  # no IP-adapter
        index[T5_LENGTH_KEY] = self.max_sequence_length
        (out / "model_index.json").write_text(json.dumps(index, indent=2))


def load_flow_components(src: str, kind: str, kw: dict) -> dict:
    """The components of a diffusers SD3 / FLUX pipeline directory or hub id (no pipeline object)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              T5EncoderModel)

    parts = {
        "transformer": (SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel).from_pretrained(
            src, subfolder="transformer", **kw),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler", **kw),
        "vae": _load_vae(src, "vae", kw),
        "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
    }
    if kind == "sd3":
        parts["text_encoder"] = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder", **kw)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw)
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
        index = _index(src, kw)
        if index is None or (index.get("text_encoder_3") or [None])[0] is not None:  # T5 is optional in SD3
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(src, subfolder="text_encoder_3", **kw)
            parts["tokenizer_3"] = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_3", **kw)
    else:
        parts["text_encoder"] = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        parts["text_encoder_2"] = T5EncoderModel.from_pretrained(src, subfolder="text_encoder_2", **kw)
        parts["tokenizer_2"] = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
    return parts


def _index(src: str, kw: dict) -> dict | None:
    path = Path(src) / "model_index.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(src, "model_index.json", revision=kw.get("revision"),
                                               local_files_only=kw.get("local_files_only", False))).read_text())
    except Exception:  # noqa: BLE001 - without the index, try to load T5 and let that error speak
        return None


def build_flow_policy(src: str, kind: str, kw: dict, resolution: int | None = None,
                      max_sequence_length: int | None = None, true_cfg_scale: float = 1.0) -> FlowPolicy:
    """A flow policy from ``tiny:<kind>``, a local pipeline directory or a hub id (``kw``: revision,
    local_files_only), in float32 on the CPU; the caller moves it."""
    if src.startswith("tiny:"):
        from .tiny_flow import build_tiny_flow_components

        parts = build_tiny_flow_components(kind)
        t5_tokenizer = parts["tokenizer_2" if kind == "flux" else "tokenizer_3"]
        max_sequence_length = max_sequence_length or t5_tokenizer.model_max_length
    else:
        parts = load_flow_components(src, kind, kw)
        index_file = Path(src) / "model_index.json"
        if max_sequence_length is None and index_file.exists():  # the length a saved pipeline was trained with
            max_sequence_length = json.loads(index_file.read_text()).get(T5_LENGTH_KEY)
    expected = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[kind]
    if type(parts["transformer"]).__name__ != expected:
        raise ModelLoadError(f"'{src}' holds a {type(parts['transformer']).__name__}, not a model of kind '{kind}'")
    return FlowPolicy(kind=kind, resolution=resolution, max_sequence_length=max_sequence_length,
                      true_cfg_scale=true_cfg_scale, **parts)
