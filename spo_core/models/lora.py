"""LoRA on the policy's UNet through diffusers' peft integration: attach, save, load, export, merge.

The reference model is the same UNet with the adapter disabled, so no second UNet is held in
memory. Saved LoRAs are in the diffusers format that ``StableDiffusionPipeline.load_lora_weights``
(and the SDXL pipeline) read; a kohya / webui export is written beside them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ..config import LoraConfig
from ..utils import atomic_dir
from .diffusion import DiffusionPolicy
from ..errors import InputError

log = logging.getLogger(__name__)

ADAPTER = "default"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"


class LoraLoadError(InputError, RuntimeError):
    """A LoRA file that does not fit the model; the message says which and what to do."""


def _pipeline_cls(kind: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline


def attach_lora(policy: DiffusionPolicy, cfg: LoraConfig, adapter_name: str = ADAPTER) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA adapter to the UNet; returns its parameters (kept in float32)."""
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        target_modules=list(cfg.target_modules),
        lora_dropout=cfg.dropout,
    )
    try:
        policy.unet.add_adapter(peft_cfg, adapter_name=adapter_name)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError
        raise LoraLoadError(f"no UNet module matched lora.target_modules={cfg.target_modules}: {exc}") from exc
    params = []
    for name, p in policy.unet.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # train adapters in fp32 even when the UNet is fp16
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise LoraLoadError(f"no UNet module matched lora.target_modules={cfg.target_modules}")
    log.info("LoRA rank %d on %s: %d trainable parameters", cfg.rank, cfg.target_modules, sum(p.numel() for p in params))
    return params


@contextlib.contextmanager
def adapters_disabled(policy: DiffusionPolicy) -> Iterator[None]:
    """The reference model: the base UNet with every adapter switched off."""
    unet = policy.unet
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def lora_state_dict(policy: DiffusionPolicy, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft key layout (``...lora_A.weight``), detached, on CPU."""
    sd = get_peft_model_state_dict(policy.unet, adapter_name=adapter_name)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_lora(policy: DiffusionPolicy, out_dir: str | Path, cfg: LoraConfig, export_kohya: bool = True,
              adapter_name: str = ADAPTER) -> Path:
    """Write the LoRA (diffusers format) and optionally a kohya/webui export, atomically."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    peft_sd = lora_state_dict(policy, adapter_name)
    with atomic_dir(out_dir) as tmp:
        _pipeline_cls(policy.kind).save_lora_weights(
            str(tmp), unet_lora_layers=convert_state_dict_to_diffusers(peft_sd), safe_serialization=True,
            unet_lora_adapter_metadata={"r": cfg.rank, "lora_alpha": cfg.lora_alpha,
                                        "target_modules": list(cfg.target_modules)},
        )
        if export_kohya:
            kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
            # kohya stores alpha per module; ours is a single value, not the rank default.
            kohya = {k: (torch.tensor(float(cfg.lora_alpha)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
            save_file(kohya, str(Path(tmp) / KOHYA_WEIGHT_NAME))
    return Path(out_dir)


def load_lora(policy: DiffusionPolicy, path: str | Path, adapter_name: str = ADAPTER, trainable: bool = False) -> None:
    """Load a LoRA (our diffusers format, the released SPO LoRAs, or a kohya/webui file) into the UNet."""
    path = Path(path)
    if not path.exists():
        raise LoraLoadError(f"LoRA '{path}' does not exist: pass a directory with {DIFFUSERS_WEIGHT_NAME} or a .safetensors file")
    kwargs = {}
    if path.is_dir():
        names = [DIFFUSERS_WEIGHT_NAME] if (path / DIFFUSERS_WEIGHT_NAME).exists() else sorted(p.name for p in path.glob("*.safetensors"))
        if not names:
            raise LoraLoadError(f"no .safetensors LoRA file in '{path}'")
        kwargs["weight_name"] = names[0]
        src = str(path)
    else:
        src = str(path)
    try:
        sd, alphas, metadata = _pipeline_cls(policy.kind).lora_state_dict(src, return_lora_metadata=True, **kwargs)
    except Exception as exc:
        raise LoraLoadError(f"could not read LoRA '{path}': {exc}. Is it a diffusers or kohya LoRA safetensors file?") from exc
    unet_sd = {k: v for k, v in sd.items() if k.startswith("unet.")}
    if not unet_sd:
        raise LoraLoadError(f"LoRA '{path}' has no UNet weights (keys like unet.*); it may be for another model family")
    bad = [k for k, v in unet_sd.items() if not bool(torch.isfinite(v).all())]
    if bad:  # before any image is generated or scored: it would only give black images
        raise LoraLoadError(f"LoRA '{path}' holds NaN/inf values in {len(bad)} of {len(unet_sd)} tensors (e.g. {bad[0]}): "
                            f"it comes from a diverged run; use an earlier checkpoint's LoRA")
    try:
        policy.unet.load_lora_adapter(unet_sd, network_alphas=alphas, prefix="unet", adapter_name=adapter_name,
                                      metadata=metadata)
    except Exception as exc:
        raise LoraLoadError(
            f"LoRA '{path}' does not fit this {policy.kind} UNet ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
            f"Check model.kind/model.pretrained match the model it was trained on."
        ) from exc
    _check_loaded(policy, unet_sd, path, adapter_name)
    for name, p in policy.unet.named_parameters():
        if "lora_" in name and f".{adapter_name}." in name:
            p.requires_grad_(trainable)


def _check_loaded(policy: DiffusionPolicy, sd: dict[str, torch.Tensor], path: Path, adapter_name: str = ADAPTER) -> None:
    # A LoRA of another model can load "successfully" with most keys ignored: count what landed.
    n_loaded = sum(1 for n, _ in policy.unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n)
    if n_loaded == 0 or n_loaded != len(sd):
        raise LoraLoadError(f"LoRA '{path}' fits this {policy.kind} UNet only partly ({n_loaded} of {len(sd)} tensors "
                            f"loaded): it was trained for another model")


def merge_lora(policy: DiffusionPolicy) -> None:
    """Fold the active adapter into the base weights (for a merged export)."""
    policy.unet.fuse_lora()


def save_merged(policy: DiffusionPolicy, out_dir: str | Path) -> Path:
    """Save the whole pipeline with the LoRA merged into the UNet weights."""
    policy.unet.fuse_lora()
    policy.unet.unload_lora()
    with atomic_dir(out_dir) as tmp:
        policy.save_pretrained(tmp)
    return Path(out_dir)
