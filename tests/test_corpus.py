"""`jobs.corpus`: the everyday caption corpus written by the recaption job's text mode (real
vLLM, SmolLM2), then used by `jobs.finetune_text` as (short, dense) and (short, paraphrase) pairs."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.everyday import seeds
from pipeline.corpus_record import corpus_versions
from pipeline.finetune_pairs import pair_versions, training_pairs
from pipeline.store import Store
from tests.conftest import MODELS_DIR, run_stage_here, write_config

CORPUS = {"name": "everyday", "num_items": 12, "seed": 5}
RECAPTION = {"actors": 1, "batch_size": 16, "engine_env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}


def test_seeds_are_distinct_and_deterministic():
    a, b = seeds(50, seed=1), seeds(50, seed=1)
    assert a == b and len({i for i, _ in a}) == 50 and len({t for _, t in a}) == 50
    assert seeds(50, seed=2) != a
    with pytest.raises(ValueError, match="distinct seeds"):
        seeds(10**6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, cluster, models):
    root = tmp_path_factory.mktemp("corpus")
    config = write_config(
        root / "c.yaml", root / "store", cluster, corpus=CORPUS, recaption=RECAPTION,
        finetune_text={"base_model": str(MODELS_DIR / "tiny-llama"), "pairs": [{"corpus": "everyday"}], "num_workers": 2,
                       "batch_size_per_worker": 2, "max_steps": 2, "checkpoint_every": 2, "precision": "fp32", "max_length": 64,
                       "builtin_eval": [], "baseline": False, "register_as": None, "eval_split": "test"},
    )
    return root, config, run_stage_here("jobs.corpus", config, cluster)


def test_corpus_has_short_dense_and_paraphrase_versions(corpus):
    root, config, result = corpus
    versions = result.versions
    assert set(result.steps) == {"short", "dense", "paraphrase"} and versions.seed == "everyday.seed"
    assert corpus_versions(load_config(config).store.uri, "everyday") == versions
    captions = Store(str(root / "store"), "captions")
    short = captions.read(versions.short)
    assert {role: step.caption_version for role, step in result.steps.items()} == {r: getattr(versions, r) for r in result.steps}
    assert result.steps["short"].captioned + result.steps["short"].rejected == 12
    assert short.num_rows >= 9  # SmolLM2 writes a usable caption for most seeds
    assert max(len(t.split()) for t in short.column("text").to_pylist()) <= 40
    dense = captions.read(versions.dense)
    assert dense.num_rows >= 0.7 * short.num_rows
    mean = lambda table: sum(len(t.split()) for t in table.column("text").to_pylist()) / max(1, table.num_rows)  # noqa: E731
    assert mean(dense) > 2 * mean(short)  # the dense rewrite is longer than the short caption
    assert set(dense.column("image_id").to_pylist()) <= set(short.column("image_id").to_pylist())


def test_corpus_rerun_writes_nothing(corpus, cluster):
    _, config, first = corpus
    again = run_stage_here("jobs.corpus", config, cluster)
    assert again.versions == first.versions
    assert all(step.captioned == 0 for step in again.steps.values())


def test_finetune_takes_corpus_pairs(corpus):
    """The pairs finetune-text trains on (the job itself is tested in test_finetune_text)."""
    root, config, _ = corpus
    cfg = load_config(config)
    names = [spec.name for spec in pair_versions(cfg)]
    assert names == ["everyday.short-vs-dense", "everyday.short-vs-paraphrase"]
    train, held_out = training_pairs(cfg)
    assert train.num_rows > 0 and set(held_out) == set(names)
    captions = Store(str(root / "store"), "captions")
    versions = corpus_versions(cfg.store.uri, "everyday")
    texts = {role: set(captions.read(getattr(versions, role)).column("text").to_pylist()) for role in ("short", "dense", "paraphrase")}
    longer = texts["dense"] | texts["paraphrase"]
    pairs = list(zip(train.column("first").to_pylist(), train.column("second").to_pylist()))
    assert all((a in texts["short"] and b in longer) or (b in texts["short"] and a in longer) for a, b in pairs)
    assert {a in texts["short"] for a, _ in pairs} == {True, False}  # each pair in a random direction
    held = {t for v in held_out.values() for pair in v for t in pair}
    assert not held & {t for pair in pairs for t in pair}  # held-out items never train
