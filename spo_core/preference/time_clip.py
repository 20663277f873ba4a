"""Time-conditioned CLIP: the step-aware preference model of SPO (REFERENCE.md section 3).

A transformers ``CLIPModel`` is kept intact (same modules, same state-dict keys, saved in CLIPModel
format) and conditioned on the diffusion timestep through forward hooks on its vision tower:

* a DiT timestep embedding: 256-d sinusoid of the raw t -> Linear -> SiLU -> Linear (vision width),
  computed once per forward and shared by all layers;
* adaLN-Zero in every vision encoder layer: SiLU -> Linear(width, 6 * width) gives
  (shift, scale, gate) for attention and for the MLP, and the layer computes
  ``h += gate * Block(LN(h) * (1 + scale) + shift)``. The hooks realise exactly that on the
  unmodified ``CLIPEncoderLayer``: a hook on ``layer_norm1``/``layer_norm2`` modulates the norm's
  output and a hook on ``self_attn``/``mlp`` multiplies the block output by the gate before the
  layer's own residual add;
* one more (shift, scale) on the pooled output, applied AFTER ``post_layernorm`` (as the reference
  code does, so its checkpoints map one-to-one). With zero weights and zero biases both placements
  are the identity; after the norm the modulation acts on the normalised feature that the
  projection sees.

At initialisation the modulation weights are zero, shift/scale biases 0 and gate biases 1, so the
model equals the base CLIP exactly (the reference code's layer init fills biases with ones by
mistake; this module does not). ``time_conditioned=False`` is the step-agnostic variant: plain CLIP,
timesteps ignored, trained the same way.

The timestep embedding travels as a keyword argument through ``CLIPVisionModel.forward``
(transformers passes unknown kwargs down to each encoder layer), so there is no global state. Each
layer's pre-hook turns it into that layer's modulation, which the sub-module hooks read; it stays
in place after the forward so that gradient checkpointing's recomputation (which re-runs the layer's
``forward`` without its hooks) sees it too. With checkpointing, run one forward per backward.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel

from ..scorers.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ScorerLoadError, load_pretrained, load_torch_state_dict

log = logging.getLogger(__name__)

TIME_CONFIG_FILE = "time_condition.json"
TIME_WEIGHTS_FILE = "time_condition.safetensors"
FORMAT_VERSION = 1
# The keyword that carries the timestep embedding through CLIPVisionModel.forward to the hooks.
_TIME_KWARG = "spo_time_embedding"


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT/GLIDE sinusoidal embedding of raw timesteps: ``[cos(t f_i), sin(t f_i)]``, (N, dim), float32."""
    t = torch.as_tensor(t).reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid of raw t -> Linear -> SiLU -> Linear to the vision width (DiT)."""

    def __init__(self, width: int, frequency_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        # DiT's init: small normal weights (the embedding only matters once modulations learn).
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_sinusoid(t, self.frequency_dim, self.max_period).to(self.mlp[0].weight.device)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _modulation(width: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(width, chunks * width); keys ``1.weight``/``1.bias`` as in the reference code."""
    return nn.Sequential(nn.SiLU(), nn.Linear(width, chunks * width))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:  # (B, tokens, width): one modulation per image
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale.to(x.dtype)) + shift.to(x.dtype)


class _LayerHooks:
    """adaLN-Zero for one ``CLIPEncoderLayer``, installed as hooks on it and its sub-modules."""

    def __init__(self, layer: nn.Module, modulation: nn.Module):
        self.modulation = modulation
        self.chunks: tuple[torch.Tensor, ...] | None = None
        self.handles = [  # kept so the hooks live as long as the model
            layer.register_forward_pre_hook(self._layer_pre, with_kwargs=True),
            layer.layer_norm1.register_forward_hook(lambda m, a, out: _modulate(out, self.chunks[0], self.chunks[1])),
            layer.self_attn.register_forward_hook(self._gate_attn),
            layer.layer_norm2.register_forward_hook(lambda m, a, out: _modulate(out, self.chunks[3], self.chunks[4])),
            layer.mlp.register_forward_hook(lambda m, a, out: out * self.chunks[5].unsqueeze(1).to(out.dtype)),
        ]

    def _layer_pre(self, module, args, kwargs):
        emb = kwargs.pop(_TIME_KWARG, None)  # popped: attention implementations must not see it
        if emb is None:
            raise RuntimeError(
                "a time-conditioned CLIP vision layer ran without a timestep: call "
                "TimeConditionedCLIP.image_features(pixel_values, timesteps) instead of the CLIPModel directly"
            )
        # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (the reference code's order).
        # Kept after the layer ran: with gradient checkpointing, transformers re-runs the layer's
        # forward (not its hooks) during backward, and the sub-module hooks must then see these.
        self.chunks = self.modulation(emb).chunk(6, dim=-1)
        return args, kwargs

    def _gate_attn(self, module, args, output):
        attn, weights = output
        return attn * self.chunks[2].unsqueeze(1).to(attn.dtype), weights


class TimeConditionedCLIP(nn.Module):
    """A CLIPModel whose vision tower is conditioned on the diffusion timestep (or not).

    ``clip`` is the wrapped ``CLIPModel``; its text tower and projections are untouched. Scores are
    ``logit_scale.exp() * cos(image, text)`` as PickScore's.
    """

    def __init__(self, clip: CLIPModel, time_conditioned: bool = True, frequency_dim: int = 256,
                 max_period: float = 10000.0):
        super().__init__()
        if not isinstance(clip, CLIPModel):
            raise TypeError(f"TimeConditionedCLIP wraps a transformers CLIPModel, got {type(clip).__name__}")
        self.clip = clip
        self.time_conditioned = bool(time_conditioned)
        self.frequency_dim = int(frequency_dim)
        self.max_period = float(max_period)
        self._hooks: list[_LayerHooks] = []
        self._pooled_handles: list[Any] = []
        self._pooled_chunks: tuple[torch.Tensor, ...] | None = None
        if not self.time_conditioned:
            return
        if getattr(clip, "_spo_time_hooks", False):
            raise ValueError("this CLIPModel is already wrapped by a time-conditioned model (its hooks would stack): "
                             "wrap a fresh copy, e.g. CLIPModel.from_pretrained(...)")
        clip._spo_time_hooks = True
        width = clip.config.vision_config.hidden_size
        layers = clip.vision_model.encoder.layers
        self.t_embedder = TimestepEmbedder(width, self.frequency_dim, self.max_period)
        self.layer_modulations = nn.ModuleList(_modulation(width, 6) for _ in layers)
        self.pooled_modulation = _modulation(width, 2)
        self.reset_time_condition()
        self._hooks = [_LayerHooks(layer, mod) for layer, mod in zip(layers, self.layer_modulations)]
        vision = clip.vision_model
        self._pooled_handles = [
            vision.register_forward_pre_hook(self._vision_pre, with_kwargs=True),
            vision.post_layernorm.register_forward_hook(self._pooled_post),
        ]

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def reset_time_condition(self) -> None:
        """adaLN-Zero init: modulation weights 0, shift/scale biases 0, gate biases 1 (model == base CLIP)."""
        if not self.time_conditioned:
            return
        for mod in self.layer_modulations:
            lin = mod[1]
            width = lin.in_features
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[2 * width: 3 * width] = 1.0  # gate_msa
            lin.bias[5 * width:] = 1.0  # gate_mlp
        self.pooled_modulation[1].weight.zero_()
        self.pooled_modulation[1].bias.zero_()

    def _vision_pre(self, module, args, kwargs):
        emb = kwargs.get(_TIME_KWARG)  # left in kwargs: the encoder layers need it too
        self._pooled_chunks = None if emb is None else self.pooled_modulation(emb).chunk(2, dim=-1)
        return args, kwargs

    def _pooled_post(self, module, args, output):
        if self._pooled_chunks is None:
            return output  # the layer hooks already raised for a call without a timestep
        shift, scale = self._pooled_chunks
        self._pooled_chunks = None
        return _modulate(output, shift, scale)

    def time_embedding(self, timesteps: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        return self.t_embedder(t)

    # ------------------------------------------------------------------ features and scores
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor | float | int | None = None) -> torch.Tensor:
        """Projected image embeddings (B, D) of preprocessed ``pixel_values`` at ``timesteps``.

        ``timesteps``: a scalar or (B,) tensor of raw diffusion timesteps; None means 0 (clean
        images). The step-agnostic variant ignores it.
        """
        kwargs = {}
        if self.time_conditioned:
            kwargs[_TIME_KWARG] = self.time_embedding(0 if timesteps is None else timesteps, pixel_values.shape[0],
                                                      pixel_values.device)
        return self.clip.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, text_index: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (N,) = logit_scale.exp() * cos(image_i, text_{text_index[i]}).

        ``text_index`` maps each of the N images to a row of ``input_ids`` (default: row i), so both
        images of a pair share one text encoding.
        """
        img = self.image_features(pixel_values, timesteps)
        txt = self.text_features(input_ids, attention_mask)
        if text_index is not None:
            txt = txt[text_index]
        cos = (nn.functional.normalize(img.float(), dim=-1) * nn.functional.normalize(txt.float(), dim=-1)).sum(-1)
        return self.logit_scale.float().exp() * cos

    # ------------------------------------------------------------------ persistence
    def time_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are not part of the CLIPModel (empty for the step-agnostic variant)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def time_config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "time_conditioned": self.time_conditioned,
            "frequency_dim": self.frequency_dim,
            "max_period": self.max_period,
            "pooled_modulation": "after_post_layernorm",
            "vision_width": int(self.clip.config.vision_config.hidden_size),
            "vision_layers": len(self.clip.vision_model.encoder.layers),
        }

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write the CLIP part in CLIPModel format, the time-conditioning weights and their json config.

        Not atomic by itself: callers write into :func:`spo_core.utils.atomic_dir` (and add the
        tokenizer and preprocessing with :func:`write_processor`).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(str(out), safe_serialization=True)
        (out / TIME_CONFIG_FILE).write_text(json.dumps(self.time_config(), indent=2) + "\n")
        if self.time_conditioned:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.time_state_dict().items()}
            save_file(tensors, str(out / TIME_WEIGHTS_FILE), metadata={"format": "pt", "spo_format_version": str(FORMAT_VERSION)})
        return out

    @classmethod
    def from_clip(cls, clip: CLIPModel | str | os.PathLike, time_conditioned: bool = True, **kwargs: Any) -> "TimeConditionedCLIP":
        """Wrap a CLIPModel (or load one from a directory / hub id), initialised to equal it exactly."""
        if not isinstance(clip, CLIPModel):
            clip = load_pretrained(CLIPModel.from_pretrained, clip, "CLIP model", dtype=torch.float32)
        return cls(clip, time_conditioned=time_conditioned, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, time_conditioned: bool | None = None) -> "TimeConditionedCLIP":
        """Load a directory written by :meth:`save_pretrained`, or any CLIPModel directory / hub id.

        A directory without ``time_condition.json`` (e.g. PickScore_v1) loads as the step-agnostic
        variant unless ``time_conditioned=True`` asks for a fresh, identity-initialised condition.
        """
        clip = load_pretrained(CLIPModel.from_pretrained, path, "CLIP model", dtype=torch.float32)
        cfg_file = Path(path) / TIME_CONFIG_FILE
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {"time_conditioned": False}
        if cfg.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ScorerLoadError(f"{cfg_file} has format_version {cfg['format_version']}; this code reads up to "
                                  f"{FORMAT_VERSION}: upgrade spo_core")
        stored = bool(cfg.get("time_conditioned", False))
        want = stored if time_conditioned is None else bool(time_conditioned)
        if stored and not want:
            raise ScorerLoadError(f"{path} holds a time-conditioned model: load it with time_conditioned=True (or None)")
        model = cls(clip, time_conditioned=want, frequency_dim=int(cfg.get("frequency_dim", 256)),
                    max_period=float(cfg.get("max_period", 10000.0)))
        if stored:
            wfile = Path(path) / TIME_WEIGHTS_FILE
            if not wfile.is_file():
                raise ScorerLoadError(f"{path}: {TIME_CONFIG_FILE} says time_conditioned but {TIME_WEIGHTS_FILE} is "
                                      "missing; re-save the model with TimeConditionedCLIP.save_pretrained")
            model.load_time_state_dict(load_file(str(wfile)), source=str(wfile))
        return model

    def load_time_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
        expected = self.time_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ScorerLoadError(f"{source} does not fit this CLIP's time conditioning: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]} (was it saved from a CLIP with another vision width/depth?)")
        for k, v in tensors.items():
            if v.shape != expected[k].shape:
                raise ScorerLoadError(f"{source}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        self.load_state_dict(tensors, strict=False)  # keys were checked above; the CLIP part stays as loaded

    @classmethod
    def from_reference_checkpoint(cls, checkpoint: str | os.PathLike, base: CLIPModel | str | os.PathLike) -> "TimeConditionedCLIP":
        """Load a step-aware model trained with the SPO reference code (``final_ckpt.bin``, or the released
        ``sd-v1-5_step-aware_preference_model.bin`` / ``sdxl_...``: a state dict of its
        ``StepAwarePreferenceModel``) on top of the matching base CLIP (PickScore_v1).

        As the reference's own loader (``load_state_dict(strict=False)`` on PickScore_v1), CLIP weights the
        checkpoint lacks keep the base's values (logged); keys that fit nowhere, tensors of another shape
        and missing time-conditioning weights are errors. Loaded with ``torch.load(weights_only=True)``.
        """
        sd = load_torch_state_dict(checkpoint, "SPO step-aware preference model")
        clip_sd, time_sd = convert_reference_state_dict(sd)
        if not time_sd:
            raise ScorerLoadError(f"{checkpoint} holds no time-conditioning weights (model.t_embedder.*, "
                                  "...adaLN_modulation.*): it is not a step-aware model of the SPO reference code")
        model = cls.from_clip(base, time_conditioned=True)
        own = model.clip.state_dict()
        # load_state_dict would raise a many-line RuntimeError for these: name the first one instead.
        wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in clip_sd.items() if k in own and v.shape != own[k].shape]
        if wrong:
            k, got, want = wrong[0]
            raise ScorerLoadError(f"{checkpoint} does not fit the base CLIP: {len(wrong)} tensors differ in shape (e.g. {k}: "
                                  f"{got} in the checkpoint, {want} in the base); pass the CLIP it was trained from as the base")
        missing, unexpected = model.clip.load_state_dict(clip_sd, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if unexpected:
            raise ScorerLoadError(f"{checkpoint} does not fit the base CLIP: {len(unexpected)} tensors it has no place for "
                                  f"(e.g. {unexpected[:3]}); pass the CLIP it was trained from as the base")
        if missing:
            log.warning("%s lacks %d of the base CLIP's %d tensors (e.g. %s): they keep the base's values, as in the "
                        "reference code", checkpoint, len(missing), len(own), missing[:3])
        model.load_time_state_dict(time_sd, source=str(checkpoint))
        return model

    def extra_repr(self) -> str:
        return f"time_conditioned={self.time_conditioned}"


def convert_reference_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a reference-code state dict into (CLIPModel state dict, time-conditioning state dict).

    Reference names: ``model.t_embedder.mlp.*``, ``model.vision_model.encoder.layers.N.adaLN_modulation.1.*``
    and ``model.vision_model.adaLN_modulation.1.*``; everything else under ``model.`` is the CLIP.
    """
    clip_sd: dict[str, torch.Tensor] = {}
    time_sd: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key[len("model."):] if key.startswith("model.") else key
        if k.startswith("t_embedder."):
            time_sd[k] = value
        elif k.startswith("vision_model.encoder.layers.") and ".adaLN_modulation." in k:
            idx, rest = k[len("vision_model.encoder.layers."):].split(".adaLN_modulation.", 1)
            time_sd[f"layer_modulations.{idx}.{rest}"] = value
        elif k.startswith("vision_model.adaLN_modulation."):
            time_sd["pooled_modulation." + k[len("vision_model.adaLN_modulation."):]] = value
        elif k.endswith("position_ids"):
            continue  # a buffer older transformers saved; recomputed at load
        else:
            clip_sd[k] = value
    return clip_sd, time_sd


def write_preprocessor_config(out_dir: str | os.PathLike, image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                              std: Sequence[float] = OPENAI_CLIP_STD) -> Path:
    """A CLIPImageProcessor-format ``preprocessor_config.json`` (shortest side + centre crop, bicubic)."""
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": int(image_size)}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": int(image_size), "width": int(image_size)},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [float(x) for x in mean], "image_std": [float(x) for x in std], "do_convert_rgb": True,
    }
    path = Path(out_dir) / "preprocessor_config.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def write_processor(out_dir: str | os.PathLike, tokenizer: Any, image_size: int, mean: Sequence[float],
                    std: Sequence[float]) -> None:
    """Make ``out_dir`` a self-contained scorer directory: tokenizer files + preprocessing json."""
    tokenizer.save_pretrained(str(out_dir))
    write_preprocessor_config(out_dir, image_size, mean, std)
