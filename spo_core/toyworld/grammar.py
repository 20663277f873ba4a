"""The toy world's language: scene descriptions <-> prompt text, and the train / held-out split.

A prompt reads ``a [size] <colour> <shape> [position] on a <background> background``, e.g.
``a small red circle at the top left on a white background`` or ``an orange square on a gray
background`` (size and position may be left unsaid). :func:`parse` inverts :func:`format_prompt`
exactly. Validation prompts use colour x shape pairs that never occur in training, so they test
composition rather than memory.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .config import WorldConfig

# Position name -> (column, row) on the 3x3 grid, and its phrase in a prompt.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
POSITION_PHRASES: dict[str, str] = {
    name: ("in the centre" if name == "centre" else f"on the {name}" if name in ("left", "right") else f"at the {name}")
    for name in POSITIONS
}


@dataclass(frozen=True)
class Scene:
    """One object on a plain background; ``size`` / ``position`` None means "not specified"."""

    colour: str
    shape: str
    background: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class WorldSplit:
    train: list[str]
    validation: list[str]
    heldout_pairs: list[tuple[str, str]]  # (colour, shape)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_prompt(scene: Scene) -> str:
    head = f"{scene.size} {scene.colour}" if scene.size else scene.colour
    text = f"{_article(head)} {head} {scene.shape}"
    if scene.position:
        text += " " + POSITION_PHRASES[scene.position]
    return f"{text} on {_article(scene.background)} {scene.background} background"


def _alternation(words) -> str:
    # Longest first so that "top left" wins over "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


@lru_cache(maxsize=8)
def _pattern(world_json: str) -> re.Pattern:
    world = WorldConfig.model_validate_json(world_json)
    phrase_to_pos = _alternation(POSITION_PHRASES.values())
    return re.compile(
        rf"^(?P<art1>an?) (?:(?P<size>{_alternation(world.sizes)}) )?(?P<colour>{_alternation(world.colours)}) "
        rf"(?P<shape>{_alternation(world.shapes)})(?: (?P<position>{phrase_to_pos}))? "
        rf"on (?P<art2>an?) (?P<background>{_alternation(world.backgrounds)}) background$"
    )


def parse_many(prompts: list[str], world: WorldConfig | None = None) -> list[Scene]:
    """Prompt texts -> scenes; raises ValueError naming the first prompt outside the grammar."""
    world = world or WorldConfig()
    pattern = _pattern(world.model_dump_json())
    return [_parse_one(p, pattern, world) for p in prompts]


def parse(prompt: str, world: WorldConfig | None = None) -> Scene:
    """Prompt text -> :class:`Scene`; raises ValueError for text outside the grammar."""
    return parse_many([prompt], world)[0]


def _parse_one(prompt: str, pattern: re.Pattern, world: WorldConfig) -> Scene:
    m = pattern.match(prompt)
    if m is None:
        raise ValueError(
            f"prompt {prompt!r} is not in the toy grammar: expected 'a [size] <colour> <shape> [position] on a "
            f"<background> background' with colours {sorted(world.colours)}, shapes {world.shapes}, sizes "
            f"{sorted(world.sizes)}, backgrounds {sorted(world.backgrounds)}"
        )
    pos = next((k for k, v in POSITION_PHRASES.items() if v == m["position"]), None)
    scene = Scene(colour=m["colour"], shape=m["shape"], background=m["background"], size=m["size"], position=pos)
    if format_prompt(scene) != prompt:  # only the articles can differ here
        raise ValueError(f"prompt {prompt!r} uses the wrong article: write {format_prompt(scene)!r}")
    return scene


def all_scenes(world: WorldConfig) -> list[Scene]:
    """Every scene the grammar can describe, in a fixed order."""
    sizes = ([None] if world.optional_size else []) + list(world.sizes)
    positions = ([None] if world.optional_position else []) + list(POSITIONS)
    return [
        Scene(colour=c, shape=s, background=b, size=z, position=p)
        for c, s, z, p, b in itertools.product(world.colours, world.shapes, sizes, positions, world.backgrounds)
    ]


def heldout_pairs(world: WorldConfig) -> list[tuple[str, str]]:
    """Colour x shape pairs reserved for validation: distinct colours, shapes cycling, chosen by the seed."""
    rng = np.random.default_rng([world.seed, 1])
    colours = [list(world.colours)[i] for i in rng.permutation(len(world.colours))]
    shapes = [world.shapes[i] for i in rng.permutation(len(world.shapes))]
    return [(colours[i], shapes[i % len(shapes)]) for i in range(world.heldout_pairs)]


def split_prompts(world: WorldConfig) -> WorldSplit:
    """Training prompts (all scenes without a held-out pair, shuffled) and ``n_validation`` held-out ones."""
    held = set(heldout_pairs(world))
    scenes = all_scenes(world)
    train = [format_prompt(s) for s in scenes if (s.colour, s.shape) not in held]
    pool = [format_prompt(s) for s in scenes if (s.colour, s.shape) in held]
    if world.n_validation > len(pool):
        raise ValueError(
            f"world.n_validation={world.n_validation} but the {len(held)} held-out colour x shape pairs give only "
            f"{len(pool)} prompts: lower n_validation or raise heldout_pairs"
        )
    rng = np.random.default_rng([world.seed, 2])
    train = [train[i] for i in rng.permutation(len(train))]
    validation = [pool[i] for i in rng.choice(len(pool), size=world.n_validation, replace=False)]
    return WorldSplit(train=train, validation=validation, heldout_pairs=sorted(held))


def vocabulary(world: WorldConfig) -> list[str]:
    """Every word a prompt can contain (the tokenizer's training corpus)."""
    words = {"a", "an", "on", "background", *world.colours, *world.shapes, *world.sizes, *world.backgrounds}
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)
