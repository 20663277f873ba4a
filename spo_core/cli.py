"""The ``spo`` command: one sub-command per pipeline stage, plus helpers.

    spo train-spo --config params.yaml --set sampler.k=8 [--resume]
    spo params sd15 -o params.yaml        # switch the pipeline to a profile
    spo profiles                          # list the packaged profiles
    spo ablation toy_methods toy_k        # ablation tables, one after another (spo_core/tables.py)

Every stage sub-command is the same entrypoint DVC calls (``python -m spo_core.stages.<stage>``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from .config import available_profiles, read_profile
from .runner import run_entrypoint
from .utils import atomic_file

# sub-command -> stage module under spo_core.stages
STAGES = {
    "toy-world": "toy_world",
    "toy-pretrain": "toy_pretrain",
    "toy-prefs": "toy_prefs",
    "toy-pickscore": "toy_pickscore",
    "prompts": "prompts",
    "noisy-pairs": "noisy_pairs",
    "train-pm": "train_pm",
    "train-spo": "train_spo",
    "train-diffusion-dpo": "train_diffusion_dpo",
    "train-d3po": "train_d3po",
    "train-ddpo": "train_ddpo",
    "train-grpo": "train_grpo",
    "evaluate-base": "evaluate_base",
    "evaluate": "evaluate",
    "generate": "generate",
}


# one line per sub-command for `spo --help`
DESCRIPTIONS = {
    "toy-world": "build the toy world (shapes, colours, renderer, ground-truth reward)",
    "toy-pretrain": "pretrain the toy base diffusion model",
    "toy-prefs": "sample toy preference pairs labelled by the toy rater",
    "toy-pickscore": "train the toy PickScore on the toy preference pairs",
    "prompts": "write the training and evaluation prompt lists",
    "noisy-pairs": "build noisy-image preference pairs for the step-aware preference model",
    "train-pm": "train the step-aware (and step-agnostic) preference models",
    "train-spo": "train an SPO LoRA (the main method)",
    "train-diffusion-dpo": "train a Diffusion-DPO LoRA (baseline)",
    "train-d3po": "train a D3PO LoRA (baseline)",
    "train-ddpo": "train a DDPO LoRA (baseline)",
    "train-grpo": "train a Flow-GRPO LoRA (baseline; flow models, also runs on the UNet models)",
    "evaluate-base": "generate and score the base model alone (kept for evaluate, which reuses it)",
    "evaluate": "score the base model and the LoRAs with AI-feedback scorers, with CIs",
    "generate": "generate images from a model, optionally with a LoRA",
    "ablation": "run ablation tables (spo_core/ablations/*.yaml)",
    "params": "write a profile's parameters to params.yaml (switches the pipeline's profile)",
    "profiles": "list the packaged profiles",
}


def _help() -> str:
    width = max(map(len, DESCRIPTIONS))
    lines = [__doc__.strip(), "", "sub-commands (`spo COMMAND --help` for each one's options):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in DESCRIPTIONS.items()]
    return "\n".join(lines) + "\n"


def params_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spo params", description="Write the parameters of a profile. With -o the file is replaced only when "
        "the profile is valid (a typo never empties params.yaml); without it they go to stdout.")
    parser.add_argument("profile", help=f"profile name ({', '.join(available_profiles())}) or a YAML file")
    parser.add_argument("-o", "--output", help="file to write (e.g. params.yaml), atomically")
    args = parser.parse_args(argv)

    def body() -> int:
        from .params_file import params_text  # every stage's values spelled out (dvc.yaml lists single keys)

        text = params_text(args.profile)
        if args.output:
            with atomic_file(args.output, "w") as fh:
                fh.write(text)
            print(f"wrote profile '{args.profile}' to {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0

    return run_entrypoint(body)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_help())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in DESCRIPTIONS:
        sys.stderr.write(f"spo: error: unknown command '{command}': choose one of {', '.join(DESCRIPTIONS)}\n")
        return 2
    if command == "ablation":
        from .tables import main as tables_main

        return tables_main(rest)
    if command == "profiles":
        print("\n".join(available_profiles()))
        return 0
    if command == "params":
        return params_main(rest)
    mod = importlib.import_module(f"spo_core.stages.{STAGES[command]}")
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
