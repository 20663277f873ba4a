"""Tests for spo_core.data.prompts: every source format, error cases, the real shared files."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from spo_core.data.prompts import PromptFileError, load_prompts, sample_prompts

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_list_source_strips_and_limits():
    assert load_prompts("list", prompts=[" a cat ", "", "a dog", "  "]) == ["a cat", "a dog"]
    assert load_prompts("list", prompts=["x", "y", "z"], limit=2) == ["x", "y"]
    with pytest.raises(ValueError, match="got no prompts"):
        load_prompts("list", prompts=[])
    with pytest.raises(ValueError, match="not strings"):
        load_prompts("list", prompts=["ok", 3])


@pytest.mark.parametrize("source", ["text", "toy"])
def test_text_file_skips_comments_and_blanks(tmp_path, source):
    f = tmp_path / "p.txt"
    f.write_text("# header comment\na red circle\n\n   # indented comment\n  a blue square  \nprompt #1 keeps its hash\n")
    assert load_prompts(source, f) == ["a red circle", "a blue square", "prompt #1 keeps its hash"]


def test_spo_json(tmp_path):
    f = tmp_path / "spo.json"
    f.write_text(json.dumps([{"caption": " a cat ", "trainset_idx": 1}, {"caption": "a dog", "trainset_idx": 7}]))
    assert load_prompts("spo_json", str(f)) == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ('{"caption": "x"}', "expected a JSON list"),
        ('[{"caption": "a"}, {"text": "b"}]', "entry 1 has no 'caption'"),
        ('[{"caption": 5}]', "non-string caption"),
        ('[{"caption": "  "}]', "no prompts found"),
    ],
)
def test_spo_json_malformed(tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(PromptFileError, match=match) as info:
        load_prompts("spo_json", f)
    assert str(f) in str(info.value) and "Fix:" in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts("text", tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PromptFileError, match="empty"):
        load_prompts("text", tmp_path / "empty.txt")
    (tmp_path / "comments.txt").write_text("# only\n\n")
    with pytest.raises(PromptFileError, match="no prompts found"):
        load_prompts("text", tmp_path / "comments.txt")
    with pytest.raises(PromptFileError, match="needs a path"):
        load_prompts("spo_json")


def _write_parti(path: Path) -> None:
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond\tAbstract\tBasic\t\n"
        'A sign that says "NA"\tWorld Knowledge\tWriting\tquoted\n'
        "NA\tAbstract\tBasic\tliteral NA is a prompt\n"
        "a cow\tAnimals\tBasic\t\n"
    )


def test_partiprompts_all_and_by_category(tmp_path):
    f = tmp_path / "parti.tsv"
    _write_parti(f)
    assert load_prompts("partiprompts", f) == ["bond", 'A sign that says "NA"', "NA", "a cow"]
    assert load_prompts("partiprompts", f, category="abstract") == ["bond", "NA"]
    with pytest.raises(PromptFileError, match=r"no prompts in category 'Food'.*Abstract"):
        load_prompts("partiprompts", f, category="Food")
    with pytest.raises(ValueError, match="only applies to source 'partiprompts'"):
        load_prompts("text", f, category="Abstract")


def test_partiprompts_without_prompt_column(tmp_path):
    f = tmp_path / "parti.tsv"
    f.write_text("Text\tCategory\nbond\tAbstract\n")
    with pytest.raises(PromptFileError, match="no 'Prompt' column"):
        load_prompts("partiprompts", f)


def test_pickapic_parquet_and_json_dedup(tmp_path):
    df = pd.DataFrame({"caption": ["b cat", "a dog", "b cat", " a dog ", "c fox"], "jpg_0": [b"x"] * 5})
    df.to_parquet(tmp_path / "val.parquet")
    expected = ["b cat", "a dog", "c fox"]
    assert load_prompts("pickapic", tmp_path / "val.parquet") == expected
    df[["caption"]].to_json(tmp_path / "val.jsonl", orient="records", lines=True)
    assert load_prompts("pickapic", tmp_path / "val.jsonl") == expected
    df[["caption"]].to_json(tmp_path / "val.json", orient="records")
    assert load_prompts("pickapic", tmp_path / "val.json", limit=2) == expected[:2]
    # A folder of shards is read in name order.
    shards = tmp_path / "shards"
    shards.mkdir()
    df.iloc[3:].to_parquet(shards / "b.parquet")
    df.iloc[:3].to_parquet(shards / "a.parquet")
    assert load_prompts("pickapic", shards) == expected


def test_pickapic_errors(tmp_path):
    pd.DataFrame({"prompt": ["x"]}).to_parquet(tmp_path / "nocap.parquet")
    with pytest.raises(PromptFileError, match="no 'caption' column"):
        load_prompts("pickapic", tmp_path / "nocap.parquet")
    pd.DataFrame({"caption": ["x", None]}).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(PromptFileError, match=r"rows \[1\] have non-string captions"):
        load_prompts("pickapic", tmp_path / "none.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PromptFileError, match="cannot be read as parquet"):
        load_prompts("pickapic", tmp_path / "bad.parquet")
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts("pickapic", tmp_path / "missing.parquet")


def test_pickapic_hub_id_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(PromptFileError, match="pip install datasets"):
        load_prompts("pickapic", "yuvalkirstain/pickapic_v1")


def test_pickapic_hub_id_goes_through_datasets(monkeypatch):
    calls = {}

    class FakeStream:
        def select_columns(self, cols):
            calls["cols"] = cols
            return iter([{"caption": "a"}, {"caption": "b"}, {"caption": "a"}])

    def load_dataset(repo, split, streaming):
        calls.update(repo=repo, split=split, streaming=streaming)
        return FakeStream()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_prompts("pickapic", "owner/pickapic_v1") == ["a", "b"]
    assert calls == {"repo": "owner/pickapic_v1", "split": "validation_unique", "streaming": True, "cols": ["caption"]}
    load_prompts("pickapic", "owner/pickapic_v1:test")
    assert calls["split"] == "test"


def test_unknown_source_and_bad_limit():
    with pytest.raises(ValueError, match="unknown prompt source 'csv'"):
        load_prompts("csv")
    with pytest.raises(ValueError, match="limit"):
        load_prompts("list", prompts=["a"], limit=0)


def test_sample_prompts_deterministic_nested_ordered():
    prompts = [f"p{i}" for i in range(50)]
    s10 = sample_prompts(prompts, 10, seed=3)
    assert s10 == sample_prompts(prompts, 10, seed=3)
    assert len(set(s10)) == 10
    assert s10 == sorted(s10, key=prompts.index)  # original order kept
    assert set(s10) <= set(sample_prompts(prompts, 20, seed=3))
    assert s10 != sample_prompts(prompts, 10, seed=4)
    assert sample_prompts(prompts, 50, seed=0) == prompts
    with pytest.raises(ValueError, match="cannot sample 51 prompts from 50"):
        sample_prompts(prompts, 51, seed=0)


@pytest.mark.skipif(not SHARED_PROMPTS.is_dir(), reason="../shared/data/prompts not present beside the repo")
def test_real_shared_prompt_files():
    spo = load_prompts("spo_json", SHARED_PROMPTS / "spo_4k_training_prompts.json")
    assert len(spo) == 4000 and spo[0] == "a cat driving a nuke"
    parti = load_prompts("partiprompts", SHARED_PROMPTS / "PartiPrompts.tsv")
    assert len(parti) == 1632 and parti[0] == "bond"
    assert any('"PEACE"' in p for p in parti)  # quotes inside prompts survive
    animals = load_prompts("partiprompts", SHARED_PROMPTS / "PartiPrompts.tsv", category="Animals")
    assert 0 < len(animals) < len(parti)
    simple = load_prompts("text", SHARED_PROMPTS / "simple_animals.txt")
    assert len(simple) == 45 and simple[:2] == ["cat", "dog"]
