"""Typed configs: YAML + env + --set overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, load_config

REPO = Path(__file__).resolve().parent.parent


def test_shipped_configs_validate():
    local = load_config(REPO / "configs/local.yaml")
    assert isinstance(local, PipelineConfig)
    assert Path(local.store.uri).is_absolute()  # pinned for `ray job submit --working-dir`
    paper = load_config(REPO / "configs/llama3-8b-eva02.yaml")
    assert paper.models.llm == "meta-llama/Meta-Llama-3-8B-Instruct"  # a hub id stays an id
    assert paper.finetune_text.lora.r == 16 and paper.finetune_text.scale == 50.0
    assert paper.train_clip.global_batch_size == 4096 and paper.train_clip.layer_decay == 0.85
    assert paper.store.uri.startswith("s3://")


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs/local.yaml", ["ingest.batch_size=7", "embedded.samples=false", "ingest.caption_columns=[a, b]"])
    assert cfg.ingest.batch_size == 7 and cfg.embedded.samples is False and cfg.ingest.caption_columns == ["a", "b"]


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("ingest.batch_size=abc", "ingest.batch_size", "valid integer"),
        ("ingest.batch_sise=3", "ingest.batch_sise", "unknown key"),
        ("finetune_text.zero_stage=5", "finetune_text.zero_stage", "0, 1, 2 or 3"),
        ("ingest.limits.max_side=-1", "ingest.limits.max_side", "greater than or equal to 1"),
        ("ingest.split_fractions=[0.5, 0.5, 0.5]", "ingest.split_fractions", "sum to 1"),
        ("train_clip.loss=hinge", "train_clip.loss", "'clip' or 'siglip'"),
        ("evaluate.sets=[{name: t, kind: folder, source: /x, options: {class_name: a.txt}}]", "evaluate.sets.0",
         "unknown key(s) ['class_name'] for kind folder; accepted: ['class_names']"),
        ("evaluate.sets=[{name: t, kind: coco}]", "evaluate.sets.0", "source: kind coco needs a file"),
        ("evaluate.sets=[{name: T!, kind: easy_vqa}]", "evaluate.sets.0.name", "should match pattern"),
        ("evaluate.sets=[{name: a, kind: easy_vqa}, {name: a, kind: fashion_mnist}]", "evaluate.sets", "repeated: ['a']"),
        ("evaluate.sets=[{name: a, kind: imagenet, source: /x}]", "evaluate.sets.0.kind", "'dataset', 'coco'"),
    ],
)
def test_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/local.yaml", [override])
    line = next(line for line in str(err.value).splitlines() if line.strip().startswith(key + ":"))
    assert words in line


def test_missing_section_and_bad_override_syntax(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: /tmp/x\nmodels: {dir: /tmp/m, llm: /tmp/m/llm}\n")
    with pytest.raises(ConfigError, match=r"store: Field required"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(REPO / "configs/local.yaml", ["ingest"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_environment_expansion(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# ${NOT_EXPANDED_IN_COMMENTS}\nrun_dir: ${MY_RUN:-/tmp/default}\nstore: {uri: '${MY_STORE}'}\nmodels: {dir: /m, llm: org/model}\n")
    monkeypatch.setenv("MY_STORE", "s3://bucket/store")
    loaded = load_config(cfg)
    assert loaded.run_dir == "/tmp/default" and loaded.store.uri == "s3://bucket/store"
    monkeypatch.delenv("MY_STORE")
    with pytest.raises(ConfigError, match="MY_STORE is not set"):
        load_config(cfg)


def test_override_values_with_a_colon_stay_text():
    from pipeline.config import parse_overrides

    assert parse_overrides(["recaption.prompt=Describe this photo: {caption}"]) == [(["recaption", "prompt"], "Describe this photo: {caption}")]
    assert parse_overrides(["embed.caption_versions=[original, provided]"]) == [(["embed", "caption_versions"], ["original", "provided"])]


def test_evaluate_models_take_bare_references():
    cfg = load_config(REPO / "configs/local.yaml", ["evaluate.models=[minilm, models:/enc/2, {ref: ./m, name: mine}]"])
    refs = [(m.ref, m.name) for m in cfg.evaluate.models]
    assert refs == [("minilm", None), ("models:/enc/2", None), (str(Path("./m").resolve()), "mine")]
    from pipeline.config import EvaluateConfig

    assert [(s.kind, s.split) for s in EvaluateConfig().sets] == [("dataset", "test")]  # default: the dataset's test split


SPACE = "sweep.space={train_clip.text_lr: {loguniform: [1.0e-4, 1.0e-2]}, train_clip.caption_weights.provided: {uniform: [0.1, 0.9]}}"


@pytest.mark.parametrize("space, words", [
    ("{train_clip.nope: {choice: [1, 2]}}", ["sweep.space", "train_clip.nope", "unknown key"]),
    ("{train_clip.lr: {uniform: [-0.1, 0.1]}}", ["sweep.space.train_clip.lr", "-0.1", "greater than 0"]),
    ("{train_clip.adapter_blocks: {choice: [2, -1]}}", ["sweep.space.train_clip.adapter_blocks", "-1"]),
    ("{train_clip.init_temperature: {loguniform: [0.0, 0.1]}}", ["sweep.space.train_clip.init_temperature", "low must be > 0"]),
    ("{train_clip.warmup_steps: {randint: [10, 5]}}", ["sweep.space.train_clip.warmup_steps", "low < high"]),
    ("{train_clip.lr: {uniform: [0.1, 0.2], choice: [1]}}", ["sweep.space.train_clip.lr", "exactly one"]),
    ("{train_clip.num_workers: {choice: [1, 2]}}", ["train_clip.num_workers", "not a hyperparameter"]),
    ("{train_clip.epochs: {choice: [1, 2]}}", ["train_clip.epochs", "sweep.max_epochs"]),
    ("{finetune_text.lr: {choice: [0.1]}}", ["finetune_text.lr", "train_clip keys"]),
    ("{train_clip.layer_decay: {uniform: [0.5, 0.9]}}", ["train_clip.layer_decay", "sweep.mode: full"]),
])
def test_a_bad_search_space_fails_at_load_naming_the_key(space, words):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/local.yaml", [f"sweep.space={space}"])
    for word in words:
        assert word in str(e.value), str(e.value)


def test_a_search_space_is_typed_and_every_drawn_value_is_a_valid_trial_config():
    cfg = load_config(REPO / "configs/local.yaml", [SPACE, "sweep.trials=4"])
    assert cfg.sweep.space["train_clip.text_lr"].probe_values() == [1.0e-4, 1.0e-2]
    assert cfg.sweep.space["train_clip.caption_weights.provided"].kind == "uniform"
    # a full sweep may tune what a cheap one cannot
    full = load_config(REPO / "configs/local.yaml", ["sweep.mode=full", "sweep.space={train_clip.layer_decay: {uniform: [0.5, 0.9]}}"])
    assert full.sweep.space["train_clip.layer_decay"].probe_values() == [0.5, 0.9]


def test_a_bad_search_space_stops_the_sweep_job_before_anything_starts(tmp_path, capsys):
    from jobs.sweep import main as sweep_main
    from tests.conftest import write_config

    config = write_config(tmp_path / "bad.yaml", tmp_path / "store", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                          sweep={"space": {"train_clip.lr": {"uniform": [-1.0, 0.1]}}})
    assert sweep_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sweep.space.train_clip.lr" in err and "greater than 0" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()  # no Ray, no trial, nothing written
