"""Tests for spo_core.config: YAML profiles, dotted overrides, and errors that name the key."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from spo_core.config import (
    ConfigError,
    SamplerConfig,
    SPOConfig,
    TrainConfig,
    apply_overrides,
    load_section,
    load_spo_config,
    read_profile,
)

PROFILE = textwrap.dedent(
    """
    train_spo:
      model:
        pretrained: "tiny:sdxl"
        kind: sdxl
      sampler:
        num_steps: 10
        k: 2
        inner_steps: 3
        threshold: 0.4
      lora:
        rank: 64
      train:
        rounds: 3
      scorer:
        name: brightness
      prompts:
        source: list
        prompts: ["a cat", "a dog"]
    other:
      rounds: 7
    """
)


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text(PROFILE)
    return path


def _write(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_profile_values_and_defaults(profile):
    cfg = load_spo_config(profile)
    assert isinstance(cfg, SPOConfig)
    assert cfg.model.pretrained == "tiny:sdxl" and cfg.model.kind == "sdxl"
    assert (cfg.sampler.num_steps, cfg.sampler.k, cfg.sampler.inner_steps, cfg.sampler.threshold) == (10, 2, 3, 0.4)
    assert cfg.lora.rank == 64 and cfg.lora.lora_alpha == 64.0  # alpha defaults to the rank
    assert cfg.prompts.prompts == ["a cat", "a dog"]
    # Keys absent from the profile take the paper's SD defaults (REFERENCE.md section 2).
    assert cfg.sampler.kappa == 750 and cfg.sampler.guidance_scale == 5.0 and cfg.sampler.resampler == "random"
    assert cfg.loss.beta == 10.0 and cfg.loss.eps == 0.1
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 1e-4


def test_overrides_parse_yaml_values(profile):
    cfg = load_spo_config(profile, ["sampler.k=8", "sampler.resampler=win", "optim.max_grad_norm=null",
                                    "lora.target_modules=[to_q, to_v]", "train.output_dir=out=dir", "optim.lr=1e-3"])
    assert cfg.sampler.k == 8
    assert cfg.sampler.resampler == "win"
    assert cfg.optim.max_grad_norm is None
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.train.output_dir == "out=dir"  # only the first '=' splits key and value
    assert cfg.optim.lr == pytest.approx(1e-3)
    # Untouched keys keep their profile values.
    assert cfg.sampler.num_steps == 10 and cfg.train.rounds == 3


def test_overrides_do_not_mutate_input():
    data = {"sampler": {"k": 4}}
    out = apply_overrides(data, ["sampler.k=6", "train.rounds=2"])
    assert data == {"sampler": {"k": 4}}
    assert out == {"sampler": {"k": 6}, "train": {"rounds": 2}}


def test_load_section_other_class(profile):
    cfg = load_section(profile, "other", TrainConfig, ["seed=5"])
    assert cfg.rounds == 7 and cfg.seed == 5


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["sampler.kk=3"], "sampler.kk"),
        (["bogus=1"], "bogus"),
        (["lora.ranks=2"], "lora.ranks"),
    ],
)
def test_unknown_keys_are_named(profile, overrides, key):
    with pytest.raises(ConfigError) as ei:
        load_spo_config(profile, overrides)
    msg = str(ei.value)
    assert f"unknown key '{key}'" in msg


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = _write(tmp_path, """
        train_spo:
          model: {pretrained: "tiny:sd15"}
          prompts: {prompts: [a]}
          sampler: {kapa: 500}
        """)
    with pytest.raises(ConfigError, match=r"unknown key 'sampler\.kapa'"):
        load_spo_config(path)


@pytest.mark.parametrize(
    "override,key",
    [
        ("sampler.k=1", "sampler.k"),  # k >= 2: a pair needs two candidates
        ("sampler.kappa=2000", "sampler.kappa"),
        ("sampler.threshold=1.0", "sampler.threshold"),
        ("sampler.resampler=best", "sampler.resampler"),
        ("sampler.num_steps=abc", "sampler.num_steps"),
        ("model.kind=sd2", "model.kind"),
        ("model.dtype=float64", "model.dtype"),
        ("lora.rank=0", "lora.rank"),
        ("lora.init=zeros", "lora.init"),
        ("optim.lr=0", "optim.lr"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
        ("loss.eps=1.5", "loss.eps"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("train.rounds=0", "train.rounds"),
    ],
)
def test_bad_values_are_named(profile, override, key):
    with pytest.raises(ConfigError) as ei:
        load_spo_config(profile, [override])
    msg = str(ei.value)
    assert f"  - {key}:" in msg, msg
    # The offending value is echoed back as parsed.
    assert f"(got {yaml.safe_load(override.split('=', 1)[1])!r})" in msg, msg


def test_cross_field_checks(profile):
    with pytest.raises(ConfigError, match=r"sampler.*inner_steps=30 must be below sampler.num_steps=10"):
        load_spo_config(profile, ["sampler.inner_steps=30"])
    with pytest.raises(ConfigError, match="prompts.prompts is empty"):
        load_spo_config(profile, ["prompts.prompts=[]"])
    with pytest.raises(ConfigError, match="needs prompts.path"):
        load_spo_config(profile, ["prompts.source=text"])


def test_missing_required_section_keys(tmp_path):
    path = _write(tmp_path, """
        train_spo:
          prompts: {prompts: [a]}
        """)
    with pytest.raises(ConfigError, match=r"  - missing key 'model': add it to the section"):
        load_spo_config(path)


def test_missing_section_and_files(tmp_path, profile):
    with pytest.raises(ConfigError, match="has no section 'train_dpo'"):
        load_section(profile, "train_dpo", SPOConfig)
    with pytest.raises(ConfigError, match="does not exist"):
        read_profile(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown profile 'no_such_profile'"):
        read_profile("no_such_profile")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_spo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_profile(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        read_profile(scalar)


@pytest.mark.parametrize("override,match", [
    ("sampler.k", "must look like key.path=value"),
    ("=3", "empty key"),
    ("sampler.k.x=1", "'k' is not a section"),
])
def test_malformed_overrides(profile, override, match):
    with pytest.raises(ConfigError, match=match):
        load_spo_config(profile, [override])


def test_sampler_defaults_match_paper():
    s = SamplerConfig()
    assert (s.num_steps, s.eta, s.kappa, s.k, s.inner_steps, s.threshold) == (20, 1.0, 750, 4, 0, 0.3)


def test_an_online_trainer_without_a_scorer_is_refused(tmp_path):
    # Without a scorer section SPO used to train towards brightness, silently.
    path = _write(tmp_path, """
        train_spo:
          model: {pretrained: "tiny:sd15"}
          prompts: {prompts: [a]}
        """)
    with pytest.raises(ConfigError, match=r"missing key 'scorer': add it to the section"):
        load_spo_config(path)
    with pytest.raises(ConfigError, match=r"missing key 'scorer.name'"):
        load_spo_config("tiny", ["scorer={path: x}"])


@pytest.mark.parametrize("override,key", [("optim.lr=.inf", "optim.lr"), ("sampler.guidance_scale=.nan", "sampler.guidance_scale")])
def test_inf_and_nan_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"  - {key}: Input should be a finite number"):
        load_spo_config("tiny", [override])


# ----------------------------------------------------------------------------------------------
# dvc.yaml's params: the keys that change a stage's results, never the operational ones


def _dvc_stages() -> dict:
    from pathlib import Path

    return yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]


def _leaves(cls, prefix: str = "", operational: bool = False):
    """(dotted key, operational?) for every field of ``cls``, descending into sub-sections."""
    from spo_core.config import _section_types

    for name, field in cls.model_fields.items():
        op = operational or name in cls.OPERATIONAL
        subs = _section_types(field.annotation)
        if subs:
            yield from _leaves(subs[0], f"{prefix}{name}.", op)
        else:
            yield prefix + name, op


# What the brief calls operational: where and how a stage runs, how often it checkpoints or logs.
ALWAYS_OPERATIONAL = {"device", "num_threads", "launch", "checkpoint_every", "keep_checkpoints", "log_every", "resume",
                      "output_dir", "checkpoint_dir", "gradient_checkpointing", "decode_batch_size"}


@pytest.mark.parametrize("stage", sorted(_dvc_stages()))
def test_dvc_params_cover_every_result_key_and_no_operational_one(stage):
    from spo_core.ablation import stage_entry, stage_section
    from spo_core.config import result_keys

    cls, _ = stage_entry(stage)
    section = stage_section(stage)
    listed = ["" if k == section else k.removeprefix(f"{section}.") for k in _dvc_stages()[stage]["params"]]
    leaves = dict(_leaves(cls))
    covers = lambda key, leaf: key == "" or leaf == key or leaf.startswith(key + ".")  # noqa: E731 ("": the section)
    for key in listed:
        assert any(covers(key, leaf) for leaf in leaves), f"dvc.yaml {stage}: '{key}' is no key of {cls.__name__}"
    uncovered = [leaf for leaf, op in leaves.items() if not op and not any(covers(k, leaf) for k in listed)]
    assert not uncovered, f"dvc.yaml {stage}: params omit result keys {uncovered}"
    operational = [leaf for leaf, op in leaves.items() if op and any(covers(k, leaf) for k in listed)]
    assert not operational, f"dvc.yaml {stage}: params list operational keys {operational} (a change would rerun it)"
    assert not [leaf for leaf, op in leaves.items() if leaf.rsplit(".", 1)[-1] in ALWAYS_OPERATIONAL and not op]
    # Whole sub-sections where they hold no operational key: the list stays short and complete.
    assert listed == result_keys(cls), f"dvc.yaml {stage}: write params as {[f'{section}.{k}' for k in result_keys(cls)]}"


def test_result_keys_descend_only_into_sections_with_operational_keys():
    from spo_core.config import result_keys
    from spo_core.preference.config import TrainPMConfig

    keys = result_keys(SPOConfig)
    assert "lora" in keys and "loss" in keys and "monitor" in keys  # whole sections
    assert "train.rounds" in keys and "train" not in keys and "train.checkpoint_every" not in keys
    assert "sampler.k" in keys and "sampler.decode_batch_size" not in keys
    assert "model.pretrained" in keys and "model.local_files_only" not in keys
    assert not {"device", "launch"} & set(keys)
    pm = result_keys(TrainPMConfig)
    assert "batch_size" in pm and "mixed_precision" in pm
    assert not {"checkpoint_every", "resume", "eval_every", "gradient_checkpointing", "device"} & set(pm)


def test_params_read_as_dvc_writes_them(tmp_path):
    # `dvc exp run -S` rewrites params.yaml as YAML 1.2 (ruamel): `mixed_precision: 'no'` loses its
    # quotes, which YAML 1.1 (PyYAML) read as false and the trainer refused. Read YAML 1.2 scalars too.
    path = _write(tmp_path, """
        train_spo:
          model: {pretrained: "tiny:sd15"}
          scorer: {name: brightness}
          prompts: {prompts: [a]}
          train: {mixed_precision: no, save_merged: true}
          optim: {lr: 1e-3, adam_eps: 1.0e-08}
        """)
    cfg = load_spo_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.train.save_merged is True
    assert cfg.optim.lr == 1e-3 and cfg.optim.adam_eps == 1e-8
    assert load_spo_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
