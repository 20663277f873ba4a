"""Released weights from configuration: the SPO reference's step-aware preference models (``.bin``),
kohya/webui LoRAs with SGM block names (SDXL LoRAs as civitai ships them) and LoRAs by hub id.

Everything is tiny and random: a tiny CLIP stands in for PickScore_v1 and the tiny SDXL UNet for SDXL;
the files are written in the key layouts the real releases use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from spo_core.config import LoraConfig, ModelConfig, load_spo_config, validate_section
from spo_core.evaluation import check_loras, model_specs, use_model
from spo_core.models.diffusion import load_policy
from spo_core.models.lora import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    LoraLoadError,
    attach_lora,
    hub_lora_id,
    load_lora,
    resolve_lora,
    save_lora,
)
from spo_core.preference.time_clip import TimeConditionedCLIP, write_processor
from spo_core.preference.tiny import save_tiny_clip
from spo_core.scorers.base import build_scorer
from spo_core.scorers.preprocess import ScorerLoadError
from spo_core.stages import generate

RELEASED_SPM = "sd-v1-5_step-aware_preference_model.bin"  # the reference's released file name
# What civitai SDXL LoRAs touch: attention, the transformer's projections and MLP, and (LoCon) ResBlocks.
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj"]


def _one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg


# ------------------------------------------------------------------------------ step-aware model (.bin)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "base", image_size=16, patch_size=4)


def _reference_state_dict(clip_dir: Path, seed: int = 3) -> dict[str, torch.Tensor]:
    """A state dict of the reference's ``StepAwarePreferenceModel`` (``self.model`` = its
    HFTimeConditionedCLIPModel), written from the reference layout: CLIP keys under ``model.``,
    ``model.t_embedder.mlp.{0,2}``, ``model.vision_model.encoder.layers.N.adaLN_modulation.1`` and
    ``model.vision_model.adaLN_modulation.1``, plus the position_ids buffers older transformers saved."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_dir))
    g = torch.Generator().manual_seed(seed)
    width = clip.config.vision_config.hidden_size
    sd = {f"model.{k}": v.clone() for k, v in clip.state_dict().items()}
    sd["model.logit_scale"] = sd["model.logit_scale"] + 0.5  # fine-tuned CLIP weights travel too
    sd["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    sd["model.t_embedder.mlp.0.weight"] = torch.randn(width, 256, generator=g) * 0.02
    sd["model.t_embedder.mlp.0.bias"] = torch.randn(width, generator=g) * 0.1
    sd["model.t_embedder.mlp.2.weight"] = torch.randn(width, width, generator=g) * 0.2
    sd["model.t_embedder.mlp.2.bias"] = torch.randn(width, generator=g) * 0.1
    for i in range(clip.config.vision_config.num_hidden_layers):
        sd[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = torch.randn(6 * width, width, generator=g) * 0.2
        sd[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = torch.ones(6 * width) + 0.1 * torch.randn(6 * width, generator=g)
    sd["model.vision_model.adaLN_modulation.1.weight"] = torch.randn(2 * width, width, generator=g) * 0.2
    sd["model.vision_model.adaLN_modulation.1.bias"] = torch.randn(2 * width, generator=g) * 0.1
    return sd


@pytest.fixture(scope="module")
def released_spm(clip_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("released")
    sd = _reference_state_dict(clip_dir)
    torch.save(sd, folder / RELEASED_SPM)
    return folder / RELEASED_SPM, sd


def _our_directory(clip_dir: Path, sd: dict[str, torch.Tensor], out: Path) -> Path:
    """The same weights put into our model by OUR names (the inverse of the reference layout), saved
    as a train_pm directory: what the converted checkpoint must score like."""
    model = TimeConditionedCLIP.from_clip(clip_dir)
    ours = {}
    for k, v in sd.items():
        m = re.fullmatch(r"model\.vision_model\.encoder\.layers\.(\d+)\.adaLN_modulation\.(.*)", k)
        if m:
            ours[f"layer_modulations.{m.group(1)}.{m.group(2)}"] = v
        elif k.startswith("model.vision_model.adaLN_modulation."):
            ours["pooled_modulation." + k.rsplit("adaLN_modulation.", 1)[1]] = v
        elif k.startswith("model.t_embedder."):
            ours[k[len("model."):]] = v
    model.load_time_state_dict(ours)
    with torch.no_grad():
        model.clip.logit_scale.copy_(sd["model.logit_scale"])
    model.save_pretrained(out)
    write_processor(out, AutoTokenizer.from_pretrained(str(clip_dir)), 16, (0.48145466, 0.4578275, 0.40821073),
                    (0.26862954, 0.26130258, 0.27577711))
    return out


def test_released_step_aware_checkpoint_loads_through_the_stage_config_and_scores(clip_dir, released_spm, tmp_path):
    ckpt, sd = released_spm
    options = json.dumps({"base": str(clip_dir), "processor": str(clip_dir)})
    # The train_spo stage's configuration naming the released file, as a user writes it in params.yaml.
    cfg = load_spo_config("tiny", [f"scorer={{name: step_aware, path: '{ckpt}', options: {options}}}"])
    scorer = build_scorer(cfg.scorer.name, cfg.scorer.path, "cpu", **cfg.scorer.options)
    assert scorer.time_conditioned
    images = torch.rand(4, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square", "a red circle", "a cat"]
    t = torch.tensor([999, 500, 120, 0])
    got = scorer.score(images, prompts, t)

    ref = build_scorer("step_aware", str(_our_directory(clip_dir, sd, tmp_path / "ours")))
    torch.testing.assert_close(got, ref.score(images, prompts, t), rtol=0, atol=1e-5)
    # The conditioning is live: the same images score differently at another step, and unlike plain CLIP.
    assert (scorer.score(images, prompts, 999) - scorer.score(images, prompts, 0)).abs().max() > 1e-3
    plain = build_scorer("pickscore", str(clip_dir)).score(images, prompts)
    assert (scorer.score(images, prompts, 0) - plain).abs().max() > 1e-3
    # A folder holding the released file loads the same way.
    folder = build_scorer("step_aware", str(ckpt.parent), base=str(clip_dir), processor=str(clip_dir))
    torch.testing.assert_close(folder.score(images, prompts, t), got, rtol=0, atol=0)
    # As in the reference's loader, CLIP weights a checkpoint lacks keep the base's values (here the
    # text tower, unchanged from the base): same scores.
    partial = tmp_path / "partial.bin"
    torch.save({k: v for k, v in sd.items() if not k.startswith("model.text_model.")}, partial)
    part = build_scorer("step_aware", str(partial), base=str(clip_dir), processor=str(clip_dir))
    torch.testing.assert_close(part.score(images, prompts, t), got, rtol=0, atol=0)


def test_released_step_aware_checkpoint_errors_are_one_line(clip_dir, released_spm, tmp_path):
    ckpt, sd = released_spm
    # Default base (PickScore_v1 from the hub) while offline: the option to set is named.
    with pytest.raises(ScorerLoadError) as exc:
        build_scorer("step_aware", str(ckpt), processor=str(clip_dir))
    msg = _one_line(str(exc.value))
    assert "options.base" in msg and "yuvalkirstain/PickScore_v1" in msg and "offline" in msg.lower()
    # A base of another width: one line naming a tensor, not torch's many-line RuntimeError.
    wide = save_tiny_clip(tmp_path / "wide", image_size=16, patch_size=4, width=48)
    with pytest.raises(ScorerLoadError) as exc:
        build_scorer("step_aware", str(ckpt), base=str(wide), processor=str(clip_dir))
    assert "differ in shape" in _one_line(str(exc.value))
    # No tokenizer (the reference's processor, laion/CLIP-ViT-H-14, from the hub offline).
    with pytest.raises(ScorerLoadError) as exc:
        build_scorer("step_aware", str(ckpt), base=str(clip_dir))
    assert "options.processor" in _one_line(str(exc.value)) and "laion/CLIP-ViT-H-14" in str(exc.value)
    # Two checkpoints in one folder: which one is meant?
    two = tmp_path / "two"
    two.mkdir()
    for name in (RELEASED_SPM, "sdxl_step-aware_preference_model.bin"):
        torch.save({"model.logit_scale": torch.zeros(())}, two / name)
    with pytest.raises(ScorerLoadError, match="holds 2 checkpoints"):
        build_scorer("step_aware", str(two), base=str(clip_dir))
    # A checkpoint without any time conditioning is not the reference's step-aware model.
    plain = tmp_path / "plain.bin"
    torch.save({k: v for k, v in sd.items() if "adaLN" not in k and "t_embedder" not in k}, plain)
    with pytest.raises(ScorerLoadError, match="no time-conditioning weights"):
        build_scorer("step_aware", str(plain), base=str(clip_dir), processor=str(clip_dir))
    # base is for reference checkpoints only.
    with pytest.raises(ScorerLoadError, match="options.base is only for"):
        build_scorer("step_aware", str(clip_dir), base=str(clip_dir))


# ------------------------------------------------------------------------------ kohya SDXL LoRA (SGM names)

# SGM ResBlock layer names (in_layers = [norm, SiLU, conv], emb_layers = [SiLU, linear],
# out_layers = [norm, SiLU, dropout, conv]) for the diffusers ResnetBlock2D modules.
_SGM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1"}


def _sgm_name(key: str, layers_per_block: int) -> str:
    """kohya's SDXL name of a kohya key in diffusers block names, from the SGM UNet's layout:
    input_blocks[0] is conv_in, then per level ``layers_per_block`` [ResBlock, SpatialTransformer]
    entries and a Downsample; middle_block = [ResBlock, SpatialTransformer, ResBlock]; output_blocks
    hold ``layers_per_block + 1`` [ResBlock, SpatialTransformer] entries per level."""
    module, dot, tail = key.partition(".")
    m = re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", module)
    if m:
        side, level, kind, layer, rest = m.groups()
        level, layer = int(level), int(layer)
        if side == "down":
            block, prefix = 1 + level * (layers_per_block + 1) + layer, "input_blocks"
        else:
            block, prefix = level * (layers_per_block + 1) + layer, "output_blocks"
        inner = 1 if kind == "attentions" else 0
        rest = _SGM_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"lora_unet_{prefix}_{block}_{inner}_{rest}{dot}{tail}"
    m = re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", module)
    if m:
        kind, layer, rest = m.groups()
        if kind == "attentions":
            return f"lora_unet_middle_block_1_{rest}{dot}{tail}"
        return f"lora_unet_middle_block_{2 * int(layer)}_{_SGM_RESNET.get(rest, rest)}{dot}{tail}"
    raise AssertionError(f"no SGM name for {key}")


def _probe(policy) -> torch.Tensor:
    cond = policy.encode_prompts(["a red cube", "a cat"])
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return policy.guided_eps(x, torch.tensor([500, 120]), cond, 5.0)


def _tiny_sdxl():
    return load_policy(ModelConfig(pretrained="tiny:sdxl", kind="sdxl", resolution=16))


@pytest.fixture(scope="module")
def sdxl_loras(tmp_path_factory):
    """(our diffusers-format LoRA directory, the same LoRA as kohya writes SDXL ones, base and LoRA probes)."""
    root = tmp_path_factory.mktemp("sdxl_lora")
    policy = _tiny_sdxl()
    base = _probe(policy)
    cfg = LoraConfig(rank=4, alpha=8.0, target_modules=SDXL_TARGETS)  # alpha/rank = 2 must travel too
    attach_lora(policy, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    tuned = _probe(policy)
    lora_dir = save_lora(policy, root / "lora", cfg)
    lpb = policy.unet.config.layers_per_block
    sgm = {_sgm_name(k, lpb): v for k, v in load_file(str(lora_dir / KOHYA_WEIGHT_NAME)).items()}
    save_file(sgm, str(root / "civitai_sdxl_lora.safetensors"))
    return lora_dir, root / "civitai_sdxl_lora.safetensors", base, tuned


def test_sgm_fixture_has_kohya_sdxl_names(sdxl_loras):
    names = load_file(str(sdxl_loras[1])).keys()
    # Names as kohya's sd-scripts write SDXL LoRAs (input_blocks_N_1_transformer_blocks_0_attn1_to_q, ...).
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert "lora_unet_middle_block_1_proj_in.alpha" in names
    assert "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in names
    assert "lora_unet_middle_block_2_emb_layers_1.lora_up.weight" in names
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block_" in k for k in names)


def test_kohya_sgm_lora_changes_the_unet_like_the_diffusers_lora(sdxl_loras):
    lora_dir, sgm_file, base, tuned = sdxl_loras
    assert (tuned - base).abs().max() > 1e-2
    for source in (sgm_file, lora_dir):  # kohya SGM file and our diffusers-format directory
        policy = _tiny_sdxl()
        load_lora(policy, source)
        # 1e-4: a reloaded LoRA sums in another order (7e-6 measured on an AMD EPYC, below 1e-6 on an
        # Intel CPU); a wrong key mapping or scale moves the probe by more than 1e-2 (asserted above)
        torch.testing.assert_close(_probe(policy), tuned, rtol=0, atol=1e-4)


def test_kohya_sgm_lora_loads_through_the_evaluate_config(sdxl_loras, tmp_path):
    from spo_core.stages.evaluate import EvaluateConfig

    lora_dir, sgm_file, _, _ = sdxl_loras
    cfg = validate_section(EvaluateConfig, {
        "model": {"pretrained": "tiny:sdxl", "kind": "sdxl", "resolution": 16},
        "loras": {"civitai": str(sgm_file), "ours": str(lora_dir)},
        "prompts": {"source": "list", "prompts": ["a red cube", "a blue ball"]}, "scorers": [{"name": "brightness"}],
    }, "test")
    # What the evaluate stage does with its LoRA list: check the paths, load each once, then in turn.
    policy = _tiny_sdxl()
    specs = model_specs(cfg.loras, cfg.lora_scale)
    check_loras(policy, specs)
    outs = {}
    for k, spec in enumerate(specs):
        with use_model(policy, spec, adapter_name=f"eval{k}"):  # the stage's adapter names
            outs[spec.name] = _probe(policy)
    torch.testing.assert_close(outs["civitai"], outs["ours"], rtol=0, atol=1e-6)
    assert (outs["civitai"] - outs["base"]).abs().max() > 1e-2


def test_real_sdxl_kohya_names_map_to_the_sdxl_unet_blocks():
    # The tiny UNet has 2 levels of 1 layer; SDXL-base has 3 levels of 2 (10-deep transformers). Names as
    # kohya writes them for SDXL-base, with the diffusers module each belongs to (from the SGM layout).
    from diffusers.configuration_utils import FrozenDict

    from spo_core.models.lora import read_lora_state_dict
    from spo_core.models.published import SDXL_UNET_CONFIG

    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
        "lora_unet_input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k": "mid_block.attentions.0.transformer_blocks.9.attn2.to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0": "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "lora_unet_output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
        "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    }
    sd = {}
    for name in expected:
        sd.update({f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1),
                   f"{name}.alpha": torch.tensor(1.0)})
    out, _, _ = read_lora_state_dict("sdxl", sd, FrozenDict(SDXL_UNET_CONFIG))
    # diffusers' attention-processor spelling (attn1.processor.to_q_lora, to_out_lora = to_out.0) to module paths
    modules = {re.sub(r"\.to_out$", ".to_out.0",
                      re.sub(r"[._]lora\.(down|up)\.weight$", "", k.removeprefix("unet.")).replace(".processor", ""))
               for k in out}
    assert modules == set(expected.values())


def _gen(out: Path, *extra: str) -> dict[str, np.ndarray]:
    argv = ["--model", "tiny:sdxl", "--kind", "sdxl", "--resolution", "16", "--steps", "2", "--device", "cpu",
            "--prompt", "a red cube", "--prompt", "a cat", "--seed", "3", "--out", str(out), *extra]
    assert generate.main(argv) == 0
    man = json.loads((out / generate.MANIFEST).read_text())
    return {im["file"]: np.asarray(Image.open(out / im["file"]).convert("RGB")).astype(int) for im in man["images"]}


def test_spo_generate_takes_a_kohya_sgm_lora(sdxl_loras, tmp_path):
    lora_dir, sgm_file, _, _ = sdxl_loras
    kohya = _gen(tmp_path / "kohya", "--lora", str(sgm_file))
    ours = _gen(tmp_path / "ours", "--lora", str(lora_dir))
    base = _gen(tmp_path / "base")
    assert kohya.keys() == ours.keys() == base.keys()
    assert all(np.abs(kohya[f] - ours[f]).max() <= 1 for f in kohya)  # same LoRA, same images (8-bit rounding)
    assert any(np.abs(kohya[f] - base[f]).max() > 8 for f in kohya)


# ------------------------------------------------------------------------------ LoRA by hub id


def test_hub_lora_id_forms():
    assert hub_lora_id("SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA") == ("SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA", None)
    assert hub_lora_id("owner/name/sub/model.safetensors") == ("owner/name", "sub/model.safetensors")
    # Paths that are not hub ids: absolute, relative with a folder as the last part, parent refs.
    for path in ("/abs/owner/name", "artifacts/spo/lora", "./x/y", "owner/name/../x.safetensors", "nowhere"):
        assert hub_lora_id(path) is None, path


def test_hub_lora_offline_is_one_clear_line(make_policy):
    # conftest sets HF_HUB_OFFLINE=1: nothing is cached, nothing is downloaded.
    for spec in ("someone/not-cached-lora", "someone/not-cached-lora/lora.safetensors"):
        with pytest.raises(LoraLoadError) as exc:
            load_lora(make_policy("sd15"), spec)
        msg = _one_line(str(exc.value))
        assert "hub id" in msg and "Offline" in msg and "someone/not-cached-lora" in msg
    with pytest.raises(LoraLoadError, match="does not exist"):
        resolve_lora("artifacts/nowhere/lora")


@pytest.fixture
def fake_hub(monkeypatch, sdxl_loras):
    """huggingface_hub's download and listing, answered from local files (no network in tests)."""
    import huggingface_hub
    from huggingface_hub import errors

    lora_dir, sgm_file, _, _ = sdxl_loras
    repos = {"owner/spo-lora": {DIFFUSERS_WEIGHT_NAME: lora_dir / DIFFUSERS_WEIGHT_NAME},
             "owner/civitai-lora": {"civitai_sdxl_lora.safetensors": sgm_file},
             "owner/two-loras": {"a.safetensors": sgm_file, "b.safetensors": sgm_file}}
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        try:
            return str(repos[repo_id][filename])
        except KeyError:
            raise errors.RemoteEntryNotFoundError(f"404: {filename} not in {repo_id}", response=_Response()) from None

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: sorted(repos[repo_id]) + ["README.md"])
    return calls


class _Response:  # the least an HfHubHTTPError needs
    status_code = 404
    headers: dict = {}
    request = None

    def json(self):
        return {}


def test_hub_lora_ids_resolve_through_huggingface_hub(fake_hub, sdxl_loras, tmp_path):
    lora_dir, sgm_file, _, tuned = sdxl_loras
    assert resolve_lora("owner/spo-lora") == lora_dir / DIFFUSERS_WEIGHT_NAME  # the diffusers file name first
    assert resolve_lora("owner/civitai-lora") == sgm_file  # else the repo's only .safetensors file
    assert resolve_lora("owner/civitai-lora/civitai_sdxl_lora.safetensors") == sgm_file
    with pytest.raises(LoraLoadError, match="has 2 .safetensors files"):
        resolve_lora("owner/two-loras")
    policy = _tiny_sdxl()
    load_lora(policy, "owner/two-loras/b.safetensors")
    torch.testing.assert_close(_probe(policy), tuned, rtol=0, atol=1e-4)  # as above: summation order
    # spo generate --lora with a hub id: the same images as the local file.
    hub = _gen(tmp_path / "hub", "--lora", "owner/civitai-lora")
    local = _gen(tmp_path / "local", "--lora", str(sgm_file))
    assert all(np.array_equal(hub[f], local[f]) for f in hub)
    assert ("owner/civitai-lora", DIFFUSERS_WEIGHT_NAME) in fake_hub


# ------------------------------------------------------------------------------ our own LoRA files


def test_saved_lora_with_non_attention_targets_reloads_whole(sdxl_loras):
    # diffusers renames only attention projections to its format; a file mixing both namings used to
    # reload only its peft-named part ("fits only partly").
    lora_dir, _, _, tuned = sdxl_loras
    keys = load_file(str(lora_dir / DIFFUSERS_WEIGHT_NAME)).keys()
    assert any(".conv1." in k for k in keys) and any(".attn1.to_q." in k for k in keys)
    policy = _tiny_sdxl()
    load_lora(policy, lora_dir)
    torch.testing.assert_close(_probe(policy), tuned, rtol=0, atol=1e-4)  # as above: summation order
