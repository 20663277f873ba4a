"""Toy grammar: exact prompt <-> scene round trip, held-out split, determinism, tokenizer."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from spo_core.toyworld.config import WorldConfig
from spo_core.toyworld.grammar import Scene, all_scenes, format_prompt, parse, split_prompts, vocabulary
from spo_core.toyworld.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def split():
    return split_prompts(WorldConfig())


def test_every_prompt_round_trips_exactly():
    world = WorldConfig()
    scenes = all_scenes(world)
    prompts = [format_prompt(s) for s in scenes]
    assert len(set(prompts)) == len(prompts)  # distinct scenes give distinct prompts
    assert [parse(p, world) for p in prompts] == scenes


def test_examples_and_articles():
    s = Scene(colour="red", shape="circle", background="white", size="small", position="top left")
    assert format_prompt(s) == "a small red circle at the top left on a white background"
    o = Scene(colour="orange", shape="square", background="gray")
    assert format_prompt(o) == "an orange square on a gray background"
    assert parse("an orange square on a gray background") == o
    assert parse("a blue diamond in the centre on a black background").position == "centre"
    expected = Scene("cyan", "triangle", "brown", "large", "left")
    assert parse("a large cyan triangle on the left on a brown background") == expected


@pytest.mark.parametrize("bad", ["a orange square on a gray background", "a red hexagon on a white background",
                                 "a red circle on a white", "two red circles on a white background", ""])
def test_parse_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="toy grammar|wrong article"):
        parse(bad)


def test_split_sizes_and_heldout_disjointness(split):
    world = WorldConfig()
    assert len(split.train) >= 4000 and len(set(split.train)) == len(split.train)
    assert len(split.validation) == 500 and len(set(split.validation)) == 500
    held = set(split.heldout_pairs)
    assert len(held) == world.heldout_pairs
    train_pairs = {(s.colour, s.shape) for s in map(parse, split.train)}
    val_pairs = {(s.colour, s.shape) for s in map(parse, split.validation)}
    assert val_pairs <= held and not (train_pairs & held)
    # Every colour and every shape still occurs in training: validation tests composition only.
    assert {c for c, _ in train_pairs} == set(world.colours)
    assert {s for _, s in train_pairs} == set(world.shapes)


def test_split_is_deterministic_under_the_seed(split):
    again = split_prompts(WorldConfig())
    assert again.train == split.train and again.validation == split.validation
    other = split_prompts(WorldConfig(seed=1))
    assert other.heldout_pairs != split.heldout_pairs or other.train != split.train


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="lower n_validation"):
        split_prompts(WorldConfig(n_validation=5000))
    with pytest.raises(ValueError, match="both as object colours and backgrounds"):
        WorldConfig(backgrounds={"red": (1.0, 0.0, 0.0)})


def test_tokenizer_loads_as_clip_and_keeps_words_whole(tmp_path, split):
    tok = train_tokenizer(split.train, tmp_path / "tok")
    loaded = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(loaded) == len(tok)
    for word in vocabulary(WorldConfig()):
        assert loaded.tokenize(word) == [f"{word}</w>"], word
    prompt = split.validation[0]
    ids = loaded(prompt).input_ids
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    assert len(ids) == len(prompt.split()) + 2
    assert loaded.decode(ids, skip_special_tokens=True).strip() == prompt
