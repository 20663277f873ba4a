"""LoRA on the policy's denoiser through diffusers' peft integration: attach, save, load, export, merge.

The denoiser is the UNet of SD-1.5 / SDXL or the transformer of SD3 / FLUX (``policy.denoiser``).
The reference model is the same network with the adapter disabled, so no second copy is held in
memory. Saved LoRAs are in the diffusers format that the pipelines' ``load_lora_weights`` read
(``StableDiffusionPipeline``, the SDXL one, ``StableDiffusion3Pipeline``, ``FluxPipeline``); for the
UNet models a kohya / webui export is written beside them.

Loading takes our directories, diffusers files, kohya/webui files (also SDXL ones with the SGM block
names ``input_blocks``/``middle_block``/``output_blocks``, mapped by diffusers' own converter given
the UNet config) and hub ids ``owner/name`` or ``owner/name/file.safetensors``.
"""

from __future__ import annotations

import contextlib
import logging
import re
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
    import diffusers

    return getattr(diffusers, {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                               "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[kind])


def _prefix(kind: str) -> str:
    """The denoiser's key prefix in diffusers LoRA files."""
    return "unet" if kind in ("sd15", "sdxl") else "transformer"


def _net(kind: str) -> str:
    """The denoiser's name in messages."""
    return "UNet" if kind in ("sd15", "sdxl") else "transformer"


def attach_lora(policy: DiffusionPolicy, cfg: LoraConfig, adapter_name: str = ADAPTER) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA adapter to the denoiser; returns its parameters (kept in float32)."""
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        target_modules=list(cfg.target_modules),
        lora_dropout=cfg.dropout,
    )
    try:
        policy.denoiser.add_adapter(peft_cfg, adapter_name=adapter_name)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError
        raise LoraLoadError(f"no {_net(policy.kind)} module matched lora.target_modules={cfg.target_modules}: "
                            f"{exc}") from exc
    params = []
    for name, p in policy.denoiser.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # train adapters in fp32 even when the UNet is fp16
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise LoraLoadError(f"no {_net(policy.kind)} module matched lora.target_modules={cfg.target_modules}")
    log.info("LoRA rank %d on %s: %d trainable parameters", cfg.rank, cfg.target_modules, sum(p.numel() for p in params))
    return params


@contextlib.contextmanager
def adapters_disabled(policy: DiffusionPolicy) -> Iterator[None]:
    """The reference model: the base denoiser with every adapter switched off."""
    net = policy.denoiser
    net.disable_adapters()
    try:
        yield
    finally:
        net.enable_adapters()


def lora_state_dict(policy: DiffusionPolicy, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft key layout (``...lora_A.weight``), detached, on CPU."""
    sd = get_peft_model_state_dict(policy.denoiser, adapter_name=adapter_name)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_lora(policy: DiffusionPolicy, out_dir: str | Path, cfg: LoraConfig, export_kohya: bool = True,
              adapter_name: str = ADAPTER) -> Path:
    """Write the LoRA (diffusers format) and, for the UNet models, optionally a kohya/webui export, atomically."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    peft_sd = lora_state_dict(policy, adapter_name)
    metadata = {"r": cfg.rank, "lora_alpha": cfg.lora_alpha, "target_modules": list(cfg.target_modules)}
    if _prefix(policy.kind) == "transformer":  # SD3 / FLUX: peft names, as diffusers' own training scripts save
        with atomic_dir(out_dir) as tmp:
            _pipeline_cls(policy.kind).save_lora_weights(str(tmp), transformer_lora_layers=peft_sd,
                                                         safe_serialization=True,
                                                         transformer_lora_adapter_metadata=metadata)
        if export_kohya:
            log.info("no kohya export for %s LoRAs (its format is for UNet models): the diffusers file is the LoRA",
                     policy.kind)
        return Path(out_dir)
    layers = convert_state_dict_to_diffusers(peft_sd)
    if any(".lora_A." in k or ".lora_B." in k for k in layers):
        # diffusers renames only attention projections (to_q.lora.down, ...); a file that mixes those with
        # peft names (proj_in, ff, conv1 targets) loads only its peft part. Keep one naming: peft's.
        layers = peft_sd
    with atomic_dir(out_dir) as tmp:
        _pipeline_cls(policy.kind).save_lora_weights(
            str(tmp), unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata,
        )
        if export_kohya:
            kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
            # kohya stores alpha per module; ours is a single value, not the rank default.
            kohya = {k: (torch.tensor(float(cfg.lora_alpha)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
            save_file(kohya, str(Path(tmp) / KOHYA_WEIGHT_NAME))
    return Path(out_dir)


# owner/name, optionally followed by the weight file inside the repo (which must be .safetensors, so
# that a missing local path like artifacts/spo/lora is never mistaken for a hub file).
_HUB_LORA = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
                       r"(?:/(?P<file>[^\s]+\.safetensors))?$")


def hub_lora_id(spec: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, weight file or None)`` when ``spec`` has the form of a hub LoRA id, else None."""
    m = _HUB_LORA.match(str(spec))
    if m is None or ".." in str(spec):
        return None
    return m.group("repo"), m.group("file")


def resolve_lora(spec: str | Path) -> Path:
    """A local LoRA file or directory for ``spec``: the path itself, or a hub id downloaded (or taken
    from the cache) through huggingface_hub. Raises :class:`LoraLoadError` with the fix otherwise."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    hub = hub_lora_id(spec)
    if hub is None:
        raise LoraLoadError(f"LoRA '{spec}' does not exist: pass a directory with {DIFFUSERS_WEIGHT_NAME}, a "
                            f".safetensors file, or a hub id owner/name[/file.safetensors]")
    return _download_lora(*hub)


def _download_lora(repo: str, filename: str | None) -> Path:
    import huggingface_hub as hub
    from huggingface_hub import errors

    try:
        if filename is not None:
            return Path(hub.hf_hub_download(repo_id=repo, filename=filename))
        try:  # the file name diffusers' save_lora_weights writes (our LoRAs and most diffusers LoRAs)
            return Path(hub.hf_hub_download(repo_id=repo, filename=DIFFUSERS_WEIGHT_NAME))
        except errors.EntryNotFoundError as exc:
            if isinstance(exc, errors.LocalEntryNotFoundError):  # offline / not cached: not "absent"
                raise
        names = sorted(f for f in hub.list_repo_files(repo) if f.endswith(".safetensors"))
        if len(names) != 1:
            raise LoraLoadError(f"hub repo '{repo}' has {len(names)} .safetensors files ({', '.join(names[:5]) or 'none'}) "
                                f"and no {DIFFUSERS_WEIGHT_NAME}: name the LoRA file, e.g. {repo}/<file>.safetensors")
        return Path(hub.hf_hub_download(repo_id=repo, filename=names[0]))
    except LoraLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one actionable line
        what = f"{repo}/{filename}" if filename else repo
        raise LoraLoadError(
            f"LoRA '{what}' is not a local path, and as a Hugging Face hub id it could not be fetched "
            f"({type(exc).__name__}: {_first_line(exc, 200)}). Offline or not cached: run `hf download {repo}"
            f"{' ' + filename if filename else ''}` where there is network, or pass a local file or directory."
        ) from exc


def _weight_name(path: Path) -> str:
    """The LoRA file of a directory: ours (diffusers name), else its only .safetensors file."""
    if (path / DIFFUSERS_WEIGHT_NAME).exists():
        return DIFFUSERS_WEIGHT_NAME
    names = sorted(p.name for p in path.glob("*.safetensors"))
    if len(names) != 1:
        raise LoraLoadError(f"{'no' if not names else len(names)} .safetensors LoRA files in '{path}'"
                            f"{' (' + ', '.join(names[:5]) + ')' if names else ''}: pass the LoRA file itself")
    return names[0]


def read_lora_state_dict(kind: str, source: Path | dict[str, torch.Tensor], unet_config) -> tuple[dict, dict | None, dict | None]:
    """(state dict in diffusers names, kohya network alphas, adapter metadata) of a local LoRA file,
    directory or state dict, through diffusers' ``lora_state_dict`` for the ``kind`` pipeline.

    ``unet_config`` lets diffusers map kohya's SGM block numbers (``input_blocks_4_1_...``) to the
    UNet's blocks (``down_blocks_1_attentions_0_...``); LoRAs without SGM names pass unchanged.
    """
    kwargs = {}
    if isinstance(source, Path) and source.is_dir():
        kwargs["weight_name"] = _weight_name(source)
    src = str(source) if isinstance(source, Path) else source
    if kind == "sd3":  # no network alphas in SD3's loader
        sd, metadata = _pipeline_cls(kind).lora_state_dict(src, return_lora_metadata=True, **kwargs)
        return sd, None, metadata
    if kind == "flux":
        return _pipeline_cls(kind).lora_state_dict(src, return_alphas=True, return_lora_metadata=True, **kwargs)
    return _pipeline_cls(kind).lora_state_dict(src, return_lora_metadata=True, unet_config=unet_config, **kwargs)


def load_lora(policy: DiffusionPolicy, path: str | Path, adapter_name: str = ADAPTER, trainable: bool = False) -> None:
    """Load a LoRA into the denoiser: our directory, a diffusers or kohya/webui file (SGM block names
    included, e.g. SDXL LoRAs from civitai), a released SPO LoRA, or a hub id (see :func:`resolve_lora`)."""
    path = resolve_lora(path)
    prefix = _prefix(policy.kind)
    try:
        sd, alphas, metadata = read_lora_state_dict(policy.kind, path, policy.denoiser.config)
    except LoraLoadError:
        raise
    except Exception as exc:
        raise LoraLoadError(f"could not read LoRA '{path}': {_first_line(exc)}. Is it a diffusers or kohya LoRA "
                            f"safetensors file for this {policy.kind} {_net(policy.kind)}?") from exc
    net_sd = {k: v for k, v in sd.items() if k.startswith(f"{prefix}.")}
    if not net_sd:
        raise LoraLoadError(f"LoRA '{path}' has no {_net(policy.kind)} weights (keys like {prefix}.*); it may be for "
                            f"another model family")
    n_text = sum(1 for k in sd if k.startswith("text_encoder"))
    if n_text:  # webui applies these too; this project trains and loads the denoiser part only
        log.warning("LoRA '%s': %d text-encoder tensors are ignored (only the %s part is loaded)", path, n_text,
                    _net(policy.kind))
    bad = [k for k, v in net_sd.items() if not bool(torch.isfinite(v).all())]
    if bad:  # before any image is generated or scored: it would only give black images
        raise LoraLoadError(f"LoRA '{path}' holds NaN/inf values in {len(bad)} of {len(net_sd)} tensors (e.g. {bad[0]}): "
                            f"it comes from a diverged run; use an earlier checkpoint's LoRA")
    try:
        policy.denoiser.load_lora_adapter(net_sd, network_alphas=alphas, prefix=prefix, adapter_name=adapter_name,
                                          metadata=metadata)
    except Exception as exc:
        raise LoraLoadError(
            f"LoRA '{path}' does not fit this {policy.kind} {_net(policy.kind)} ({type(exc).__name__}: {_first_line(exc)}). "
            f"Check model.kind/model.pretrained match the model it was trained on."
        ) from exc
    _check_loaded(policy, net_sd, path, adapter_name)
    for name, p in policy.denoiser.named_parameters():
        if "lora_" in name and f".{adapter_name}." in name:
            p.requires_grad_(trainable)


def _first_line(exc: Exception, limit: int = 300) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def _check_loaded(policy: DiffusionPolicy, sd: dict[str, torch.Tensor], path: Path, adapter_name: str = ADAPTER) -> None:
    # A LoRA of another model can load "successfully" with most keys ignored: count what landed.
    n_loaded = sum(1 for n, _ in policy.denoiser.named_parameters() if "lora_" in n and f".{adapter_name}." in n)
    if n_loaded == 0 or n_loaded != len(sd):
        raise LoraLoadError(f"LoRA '{path}' fits this {policy.kind} {_net(policy.kind)} only partly ({n_loaded} of {len(sd)} tensors "
                            f"loaded): it was trained for another model")


def merge_lora(policy: DiffusionPolicy) -> None:
    """Fold the active adapter into the base weights (for a merged export)."""
    policy.denoiser.fuse_lora()


def save_merged(policy: DiffusionPolicy, out_dir: str | Path) -> Path:
    """Save the whole pipeline with the LoRA merged into the denoiser's weights."""
    policy.denoiser.fuse_lora()
    policy.denoiser.unload_lora()
    with atomic_dir(out_dir) as tmp:
        policy.save_pretrained(tmp)
    return Path(out_dir)
