"""``spo generate``: images from a base model, optionally with a LoRA (ours or a released SPO LoRA).

    spo generate --model tiny:sd15 --prompt "a red circle" --num-images 4 --out samples/
    spo generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora artifacts/sd15/spo/lora \\
        --prompts-file prompts.txt --seed 0 --out samples/
    spo generate --model DIR --kind sdxl --vae madebyollin/sdxl-vae-fp16-fix --lora spo_sdxl.safetensors ...
    spo generate --model stabilityai/stable-diffusion-xl-base-1.0 --kind sdxl --lora OWNER/NAME/lora.safetensors ...

Sampling is the evaluation protocol (DDIM, eta 1, CFG 5, 20 steps by default) with the same seeds:
image j of prompt p uses seed + p * num_images + j, so ``spo generate`` with the same settings
reproduces the images ``evaluate`` scored. Writes one PNG per image, named by prompt index, image
index and seed (``00003_01_seed7.png``), and ``manifest.json`` giving each file's prompt; all files
appear in --out together when the run succeeds (nothing is left there by a failed run).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..config import ModelConfig, validate_section
from ..data.prompts import PromptFileError, load_prompts
from ..errors import InputError
from ..evaluation import EvalSamplerConfig, item_table, iter_images, model_specs, save_images, use_model
from ..models.diffusion import load_policy
from ..reporting import write_json_atomic
from ..runner import run_entrypoint
from ..utils import resolve_device, seed_everything

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spo generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, local diffusers pipeline directory, or tiny:sd15 / tiny:sdxl")
    p.add_argument("--kind", choices=["sd15", "sdxl", "sd3", "flux"], default="sd15",
                   help="model family (default sd15; sd3: SD3/SD3.5, flux: FLUX.1)")
    p.add_argument("--vae", default=None, help="separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weights dtype (default float16 on GPU, float32 on CPU)")
    p.add_argument("--lora", default=None, help="LoRA directory (ours), .safetensors file (diffusers or kohya/webui, SDXL "
                   "SGM names included) or hub id owner/name[/file.safetensors]")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA weight (0 gives the base model; default 1)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line ('#' lines skipped)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1.0)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--batch-size", type=int, default=4, help="images generated together (default 4)")
    p.add_argument("--out", default="generated", help="output directory (default ./generated)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--local-files-only", action="store_true", help="never contact the hub for model files")
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = [s.strip() for s in args.prompt if s.strip()]
    if args.prompts_file:
        prompts += load_prompts("text", path=args.prompts_file)
    if not prompts:
        raise PromptFileError("no prompts given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def generate(args: argparse.Namespace) -> Path:
    """Generate the images described by parsed ``args``; returns the manifest path."""
    for flag, v in (("--num-images", args.num_images), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if v < 1:
            raise InputError(f"{flag} must be >= 1, got {v}")
    prompts = _prompts(args)
    device = resolve_device(args.device)
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    model_cfg = validate_section(ModelConfig, dict(pretrained=args.model, kind=args.kind, vae=args.vae, dtype=dtype,
                                                   resolution=args.resolution, local_files_only=args.local_files_only),
                                 "the spo generate options")
    sampler = validate_section(EvalSamplerConfig, dict(num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta),
                               "the spo generate options")
    # [base] or [base, lora]; a missing LoRA fails here, before the model is loaded.
    spec = model_specs({"lora": args.lora} if args.lora else {}, args.lora_scale)[-1]
    seed_everything(args.seed)
    policy = load_policy(model_cfg, device)
    items = item_table(prompts, args.num_images, args.seed)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file: give a folder (it is created if missing)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written into a temporary folder beside `out` and moved in at the end: a failed or
    # interrupted run leaves neither partial images nor an empty folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        files = _generate_into(tmp, policy, spec, items, sampler, args, model_cfg, device, prompts)
        out.mkdir(exist_ok=True)
        for name in [*files, MANIFEST]:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d images and %s to %s", len(files), MANIFEST, out)
    return out / MANIFEST


def _generate_into(tmp: Path, policy, spec, items, sampler, args, model_cfg, device, prompts) -> list[str]:
    files: list[str] = []
    with use_model(policy, spec, adapter_name="generate"):
        for rows, imgs in iter_images(policy, items, sampler, args.batch_size, quantize=False, desc="generate"):
            files += save_images(imgs, rows, tmp)
    manifest: dict[str, Any] = {
        "model": model_cfg.model_dump(mode="json"),
        "lora": str(spec.lora) if spec.lora else None,
        "lora_scale": args.lora_scale,
        "sampler": sampler.model_dump(mode="json"),
        "seed": args.seed,
        "num_images": args.num_images,
        "resolution": policy.resolution,
        "device": str(device),
        "seed_rule": "seed + prompt_idx * num_images + image_idx",
        "images": [{"file": f, **{k: (v if k == "prompt" else int(v)) for k, v in row.items()}}
                   for f, (_, row) in zip(files, items.iterrows())],
    }
    write_json_atomic(manifest, tmp / MANIFEST)
    return files


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entrypoint(lambda: generate(args) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
