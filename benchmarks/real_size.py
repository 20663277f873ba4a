"""One SPO round at the published sizes (random weights): peak memory, seconds, UNet evaluations.

    python benchmarks/real_size.py --device cuda --model all --gradient-checkpointing both
    python benchmarks/real_size.py --device cpu --model both --resolution 128 --prompts 2 --k 2 --steps 4
    python benchmarks/real_size.py --device cpu --model flow      # SD3.5-M and FLUX.1-dev (reduced, below)

The policy is SD-1.5 or SDXL-base-1.0 built from the published configs
(:mod:`spo_core.models.published`), or SD3.5-Medium or FLUX.1-dev (:mod:`spo_core.models.published_flow`,
``--model sd3|flux|flow``) on the flow SDE, and the scorer is the full-size step-aware preference model
(PickScore's CLIP ViT-H/14 with adaLN-Zero time conditioning), so the scorer's memory and time
count as they do in a real run. The round goes through the real trainer,
``spo_core.training.train_rounds`` with ``SPOMethod``. Random weights give random scores, so the
pair filter is switched off (``sampler.threshold=0``) and every segment yields a pair.

Settings not given on the command line come from ``spo_core/profiles/<sd15|sdxl|sd35m|flux_dev>.yaml``
(``train_spo``: the paper's settings; the flow profiles' SPO recipe) on CUDA; on CPU the defaults are
reduced (128 px, 2 prompts, k=2, 4 steps, bf16), and for the flow models T5-XXL is left out (``--t5
off``: zero T5 tokens, as diffusers runs SD3 without it; 4.7B parameters), the T5 length is 64
tokens (``--max-sequence-length``) and the transformers keep a share of their blocks at full width
(``--depth``: SD3.5-M 0.25 = 6 of 24 layers, FLUX.1 0.1 = 2 + 4 of 19 + 38 blocks; FLUX's 12B
parameters do not fit in 24 GiB), so a round takes minutes, not hours, on 2 cores. Each model is built once, runs every asked gradient-checkpointing setting, and
is freed before the next one; the scorer is built once and shared.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (reset between runs
and between the round's phases); everywhere a sampled RSS high-water mark of this process (every
20 ms, also per phase) and the process-lifetime ``ru_maxrss``. Phases: ``setup`` (LoRA attach,
accelerate prepare, prompt encoding), ``sample`` (the SPO sampler with decoding and scoring) and
``train`` (the training passes and the round's checkpoint). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from typing import Any

os.environ.setdefault("SPO_DISABLE_MLFLOW", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from spo_core.config import LoraConfig, OptimConfig, SamplerConfig, SPOLossConfig, TrainConfig, read_profile  # noqa: E402
from spo_core.methods.spo import SPOMethod  # noqa: E402
from spo_core.models import published  # noqa: E402
from spo_core.models.diffusion import DiffusionPolicy  # noqa: E402
from spo_core.models.flow_policy import FlowPolicy  # noqa: E402
from spo_core.training import train_rounds  # noqa: E402
from spo_core.utils import DTYPES  # noqa: E402

log = logging.getLogger("real_size")
GIB = 2**30

PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "a bowl of ramen on a wooden table, studio photo",
    "a futuristic city skyline at night, neon reflections",
    "a red fox sitting in a snowy forest",
    "an oil painting of a sailing ship in a storm",
    "a cozy reading nook with plants and warm light",
    "a macro photo of a dew drop on a leaf",
    "a medieval castle on a cliff above the sea",
]

# Reduced CPU defaults: a round of each model in a few minutes on 2 cores. With 4 steps every step
# branches (kappa=750: the first step goes 751 -> 501); bf16 measured 1.8x faster than fp32 (AMX CPU).
CPU_DEFAULTS = dict(resolution=128, prompts=2, k=2, steps=4, dtype="bfloat16", decode_batch_size=4)
CPU_FLOW_DEPTH = {"sd3": 0.25, "flux": 0.1}  # share of the transformer's blocks on a CPU
CPU_T5_TOKENS = 64  # the (zero) T5 tokens on a CPU; the pipelines' defaults are 256 (SD3) and 512 (FLUX.1)
PROFILES = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd35m", "flux": "flux_dev"}
FLOW = ("sd3", "flux")
CUDA_DECODE_BATCH = 8


# ------------------------------------------------------------------------------------------ memory


class RssSampler:
    """Samples this process's RSS every ``interval`` s in a thread; a high-water mark per phase."""

    def __init__(self, interval: float = 0.02):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> int:
        rss = self.proc.memory_info().rss
        with self._lock:
            self.peak = max(self.peak, rss)
        return rss

    def take(self) -> int:
        """The high-water mark since the last take (then reset to the current RSS)."""
        cur = self.sample()
        with self._lock:
            peak, self.peak = self.peak, cur
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class PhaseMeter:
    """Peak memory per phase: host RSS always, CUDA allocated/reserved on a CUDA device."""

    def __init__(self, rss: RssSampler, device: torch.device):
        self.rss = rss
        self.cuda = device.type == "cuda"
        self.device = device
        self.phases: dict[str, dict[str, float]] = {}
        self.current: str | None = None

    def start(self, phase: str) -> None:
        if self.current is not None:
            self.stop()
        self.rss.take()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.current = phase

    def stop(self) -> None:
        if self.current is None:
            return
        rec = {"rss_peak_gib": self.rss.take() / GIB}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            rec["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            rec["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
        self.phases[self.current] = rec
        self.current = None

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in ("rss_peak_gib", "cuda_max_allocated_gib", "cuda_max_reserved_gib"):
            vals = [p[key] for p in self.phases.values() if key in p]
            if vals:
                out[key] = round(max(vals), 3)
        for name, rec in self.phases.items():
            for key, v in rec.items():
                out[f"{name}_{key}"] = round(v, 3)
        return out


class MeteredMethod:
    """Delegates to an SPO method; marks the sample/train phase boundaries for the meter."""

    def __init__(self, method: SPOMethod, meter: PhaseMeter):
        self._method = method
        self._meter = meter
        self.name = method.name

    def collect(self, ctx):
        self._meter.start("sample")
        try:
            return self._method.collect(ctx)
        finally:
            self._meter.start("train")  # closes "sample"

    def loss(self, ctx, batch):
        return self._method.loss(ctx, batch)

    def __getattr__(self, name: str) -> Any:  # num_items / select of older trainers
        return getattr(self._method, name)


def cuda_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"cuda_allocated_gib": round(torch.cuda.memory_allocated(device) / GIB, 3),
            "cuda_reserved_gib": round(torch.cuda.memory_reserved(device) / GIB, 3)}


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, and the next run's RSS would start
    ~1-2 GiB higher: measured, with no live tensor left behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_memory(device: torch.device) -> None:
    gc.collect()
    _malloc_trim()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ config


def fields_of(cls, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that ``cls`` knows (the profile may be ahead of or behind the code)."""
    return {k: v for k, v in (data or {}).items() if k in cls.model_fields}


def has_field(cls, name: str) -> bool:
    return name in cls.model_fields


def profile_section(kind: str) -> dict[str, Any]:
    return read_profile(PROFILES[kind])["train_spo"]


def model_settings(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Resolved settings for one model: command line, else the CPU defaults, else the profile."""
    prof = profile_section(kind)
    cpu = device.type == "cpu"

    def pick(arg_value, cpu_value, prof_value):
        if arg_value is not None:
            return arg_value
        return cpu_value if cpu else prof_value

    dtype = pick(args.dtype, CPU_DEFAULTS["dtype"], prof["model"].get("dtype", "float16"))
    mp_default = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, "no")
    s = dict(
        kind=kind,
        resolution=pick(args.resolution, CPU_DEFAULTS["resolution"], prof["model"].get("resolution")),
        prompts=pick(args.prompts, CPU_DEFAULTS["prompts"], prof["train"]["prompts_per_round"]),
        k=pick(args.k, CPU_DEFAULTS["k"], prof["sampler"]["k"]),
        steps=pick(args.steps, CPU_DEFAULTS["steps"], 20),
        dtype=dtype,
        mixed_precision=args.mixed_precision or (mp_default if cpu else prof["train"].get("mixed_precision", mp_default)),
        inner_steps=args.inner_steps if args.inner_steps is not None else prof["sampler"].get("inner_steps"),
        lora_rank=args.lora_rank or prof["lora"]["rank"],
        train_batch_size=args.train_batch_size or prof["train"]["train_batch_size"],
        gradient_accumulation_steps=prof["train"].get("gradient_accumulation_steps", 1),
        decode_batch_size=args.decode_batch_size or (CPU_DEFAULTS["decode_batch_size"] if cpu else CUDA_DECODE_BATCH),
        sample_batch_size=args.sample_batch_size,
    )
    if kind in FLOW:
        s["t5"] = (args.t5 or ("off" if cpu else "on")) == "on"
        s["depth"] = args.depth if args.depth is not None else (CPU_FLOW_DEPTH[kind] if cpu else 1.0)
        s["max_sequence_length"] = args.max_sequence_length or (CPU_T5_TOKENS if cpu else None)
    return s


def build_configs(s: dict[str, Any], gc_on: bool, rounds: int, out_dir: str) -> tuple:
    prof = profile_section(s["kind"])
    sampler = fields_of(SamplerConfig, prof["sampler"])
    sampler.update(num_steps=s["steps"], k=s["k"], threshold=0.0)
    if s["inner_steps"] is not None:
        sampler["inner_steps"] = s["inner_steps"]
    if has_field(SamplerConfig, "decode_batch_size"):
        sampler["decode_batch_size"] = s["decode_batch_size"]
    lora = fields_of(LoraConfig, prof["lora"])
    lora["rank"] = s["lora_rank"]
    optim = fields_of(OptimConfig, prof["optim"])
    loss = fields_of(SPOLossConfig, prof["loss"])
    train = fields_of(TrainConfig, prof["train"])
    train.update(rounds=rounds, prompts_per_round=s["prompts"], train_batch_size=s["train_batch_size"],
                 mixed_precision=s["mixed_precision"], output_dir=out_dir, checkpoint_every=max(rounds, 1),
                 keep_checkpoints=1, resume=False, save_merged=False)
    if has_field(TrainConfig, "export_kohya"):
        train["export_kohya"] = False
    if has_field(TrainConfig, "gradient_checkpointing"):
        train["gradient_checkpointing"] = gc_on
    if has_field(TrainConfig, "sample_batch_size") and s["sample_batch_size"] is not None:
        train["sample_batch_size"] = s["sample_batch_size"]
    return SamplerConfig(**sampler), SPOLossConfig(**loss), LoraConfig(**lora), OptimConfig(**optim), TrainConfig(**train)


# ------------------------------------------------------------------------------------------ runs


def reset_between_runs(policy: DiffusionPolicy | FlowPolicy) -> None:
    """Undo what train_rounds left on the UNet / transformer (LoRA, accelerate's forward wrapper,
    checkpointing) and accelerate's process-wide state, so the next run starts as the first did."""
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import extract_model_from_parallel

    unet = policy.denoiser
    extract_model_from_parallel(unet, keep_fp32_wrapper=False)  # restores the un-autocast forward
    if getattr(unet, "_hf_peft_config_loaded", False) or getattr(unet, "peft_config", None):
        unet.unload_lora()
    if getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    unet.requires_grad_(False)
    unet.eval()
    policy.forward_denoiser = unet
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_once(policy: DiffusionPolicy | FlowPolicy, scorer, s: dict[str, Any], gc_on: bool, rounds: int, device: torch.device,
             rss: RssSampler) -> dict[str, Any]:
    rec: dict[str, Any] = dict(model=s["kind"], gradient_checkpointing=gc_on)
    meter = PhaseMeter(rss, device)
    with tempfile.TemporaryDirectory(prefix="spo_real_size_") as out_dir:
        sampler_cfg, loss_cfg, lora_cfg, optim_cfg, train_cfg = build_configs(s, gc_on, rounds, out_dir)
        rec.update(sampler={k: v for k, v in sampler_cfg.model_dump().items()
                            if k in ("num_steps", "k", "kappa", "inner_steps", "threshold", "guidance_scale",
                                     "decode_batch_size")},
                   lora_rank=lora_cfg.rank, train_batch_size=train_cfg.train_batch_size,
                   gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
                   mixed_precision=train_cfg.mixed_precision)
        if not has_field(TrainConfig, "gradient_checkpointing") and gc_on:
            policy.denoiser.enable_gradient_checkpointing()  # older trainers: no config field
        prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f", variation {i // len(PROMPTS)}")
                   for i in range(s["prompts"])]
        method = MeteredMethod(SPOMethod(sampler_cfg, loss_cfg, scorer), meter)
        free_memory(device)
        rec.update({f"before_{k}": v for k, v in cuda_memory(device).items()})
        rec["before_rss_gib"] = round(rss.sample() / GIB, 3)
        log.info("%s, gradient checkpointing %s: one SPO round (%d prompts, k=%d, %d steps, %d px)", s["kind"],
                 "on" if gc_on else "off", s["prompts"], s["k"], s["steps"], s["resolution"])
        meter.start("setup")
        t0 = time.perf_counter()
        try:
            res = train_rounds(policy, method, prompts, lora_cfg, optim_cfg, train_cfg, device=device)
            rec["status"] = "ok"
        except torch.cuda.OutOfMemoryError as exc:
            rec["status"] = "oom"
            rec["error"] = str(exc).splitlines()[0][:300]
            res = None
        except Exception as exc:  # a benchmark reports, it does not stop the other runs
            log.exception("run failed")
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            res = None
        rec["wall_seconds"] = round(time.perf_counter() - t0, 2)
        meter.stop()
    rec.update(meter.summary())
    if "rss_peak_gib" in rec:
        rec["rss_rise_gib"] = round(rec["rss_peak_gib"] - rec["before_rss_gib"], 3)
    if "cuda_max_allocated_gib" in rec and "before_cuda_allocated_gib" in rec:
        rec["cuda_rise_gib"] = round(rec["cuda_max_allocated_gib"] - rec["before_cuda_allocated_gib"], 3)
    if res is not None:
        hist = res["history"]
        h = hist[-1] if len(hist) == 1 else None
        tot = lambda key: sum(x.get(key, 0) for x in hist)  # noqa: E731
        rec.update(
            rounds=len(hist),
            round_seconds=round(tot("seconds"), 2),
            sample_seconds=round(tot("sample_seconds"), 2),
            train_seconds=round(tot("seconds") - tot("sample_seconds"), 2),
            sample_unet_evals=int(tot("sample_unet_evals")),
            train_unet_evals=int(tot("train_unet_evals")),
            pairs=int(tot("pairs")),
        )
        if any("decode_chunks" in x for x in hist):
            rec["decode_chunks"] = int(tot("decode_chunks"))
        for key in ("loss", "grad_norm", "keep_fraction", "optimizer_steps", "train_items", "score_std"):
            if h is not None and key in h:
                rec[key] = round(float(h[key]), 6) if isinstance(h[key], float) else h[key]
    reset_between_runs(policy)
    free_memory(device)
    return rec


def build_policy(s: dict[str, Any], device: torch.device, seed: int) -> tuple[DiffusionPolicy | FlowPolicy, dict]:
    dtype = DTYPES[s["dtype"]]
    t0 = time.perf_counter()
    if s["kind"] in FLOW:
        from spo_core.models.published_flow import build_published_flow_components

        comps = build_published_flow_components(s["kind"], dtype=dtype, device=device, seed=seed, t5=s["t5"],
                                                depth=s["depth"])
        policy = FlowPolicy(kind=s["kind"], resolution=s["resolution"], max_sequence_length=s["max_sequence_length"],
                            **comps)
    else:
        comps = published.build_published_components(s["kind"], dtype=dtype, device=device, seed=seed)
        policy = DiffusionPolicy(kind=s["kind"], resolution=s["resolution"], **comps)
    policy.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {"build_seconds": round(time.perf_counter() - t0, 2)}
    info["parameters"] = {k: sum(p.numel() for p in v.parameters()) for k, v in comps.items()
                          if isinstance(v, torch.nn.Module)}
    return policy, info


def build_scorer(device: torch.device, dtype: str, seed: int) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    scorer = published.build_step_aware_scorer(device=device, seed=seed + 10, dtype=DTYPES[dtype])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return scorer, {"build_seconds": round(time.perf_counter() - t0, 2),
                    "parameters": sum(p.numel() for p in scorer.model.parameters()),
                    "dtype": str(next(scorer.model.parameters()).dtype).replace("torch.", ""),
                    "time_conditioned": scorer.time_conditioned}


def fmt(rec: dict[str, Any]) -> str:
    keys = ["status", "round_seconds", "sample_seconds", "train_seconds", "sample_unet_evals", "train_unet_evals",
            "pairs", "decode_chunks", "rss_peak_gib", "rss_rise_gib", "sample_rss_peak_gib", "train_rss_peak_gib",
            "cuda_max_allocated_gib", "cuda_max_reserved_gib", "sample_cuda_max_allocated_gib",
            "train_cuda_max_allocated_gib", "cuda_rise_gib", "loss", "grad_norm", "error"]
    return "  ".join(f"{k}={rec[k]}" for k in keys if k in rec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["sd15", "sdxl", "sd3", "flux", "both", "flow", "all"], default="both",
                    help="sd3: SD3.5-Medium, flux: FLUX.1-dev; both: sd15 + sdxl, flow: sd3 + flux, all: the four")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (cuda: 512 / 1024, cpu: 128)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per round (cuda: 10 / 2, cpu: 2)")
    ap.add_argument("--k", type=int, default=None, help="candidates per branching step (cuda: 4 / 2, cpu: 2)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (cuda: 20, cpu: 4)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (cuda: float16, cpu: bfloat16)")
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                    help="accelerate mixed precision (cuda: the profile's fp16; cpu: bf16 for bfloat16 models)")
    ap.add_argument("--gradient-checkpointing", choices=["on", "off", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--inner-steps", type=int, default=None, help="sampler.inner_steps (default: the profile's)")
    ap.add_argument("--lora-rank", type=int, default=None, help="default: the profile's (4 / 64)")
    ap.add_argument("--train-batch-size", type=int, default=None, help="pairs per micro-batch (default: the profile's)")
    ap.add_argument("--decode-batch-size", type=int, default=None, help="images decoded+scored per chunk (cuda 8, cpu 4)")
    ap.add_argument("--sample-batch-size", type=int, default=None, help="train.sample_batch_size, when the trainer has it")
    ap.add_argument("--scorer-dtype", choices=sorted(DTYPES), default=None,
                    help="the preference model's dtype (default float32, as the step_aware scorer; cpu: bfloat16 "
                         "when the scorer supports it)")
    ap.add_argument("--t5", choices=["on", "off"], default=None,
                    help="flow models: build T5-XXL (cuda: on; cpu: off, zero T5 tokens as diffusers without it)")
    ap.add_argument("--depth", type=float, default=None,
                    help="flow models: share of the transformer's blocks kept (cuda: 1; cpu: SD3.5-M 0.25, FLUX 0.1)")
    ap.add_argument("--max-sequence-length", type=int, default=None,
                    help="flow models: T5 tokens (cuda: the pipeline's 256 / 512; cpu: 64)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda but torch sees no CUDA device")
        device = torch.device("cuda", torch.cuda.current_device())
    kinds = {"both": ["sd15", "sdxl"], "flow": list(FLOW), "all": ["sd15", "sdxl", *FLOW]}.get(args.model, [args.model])
    gc_settings = {"on": [True], "off": [False], "both": [True, False]}[args.gradient_checkpointing]
    scorer_dtype = args.scorer_dtype or ("bfloat16" if device.type == "cpu" and published.scorer_dtype_supported()
                                         else "float32")

    t_start = time.perf_counter()
    rss = RssSampler()
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "models": {},
        "runs": [],
    }
    try:
        scorer, sinfo = build_scorer(device, scorer_dtype, args.seed)
        sinfo.update(cuda_memory(device), rss_gib=round(rss.sample() / GIB, 3))
        report["scorer"] = sinfo
        log.info("step-aware scorer: %s", sinfo)
        for kind in kinds:
            s = model_settings(kind, args, device)
            policy, info = build_policy(s, device, args.seed)
            info.update(settings=s, **cuda_memory(device), rss_after_build_gib=round(rss.sample() / GIB, 3))
            report["models"][kind] = info
            log.info("%s built: %s", kind, info)
            for gc_on in gc_settings:
                rec = run_once(policy, scorer, s, gc_on, args.rounds, device, rss)
                report["runs"].append(rec)
                print(f"{kind} gradient_checkpointing={'on' if gc_on else 'off'}: {fmt(rec)}", flush=True)
            del policy
            free_memory(device)
    finally:
        rss.close()
    report["ru_maxrss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    report["total_seconds"] = round(time.perf_counter() - t_start, 2)
    print(f"total {report['total_seconds']} s, ru_maxrss {report['ru_maxrss_gib']} GiB", flush=True)
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
