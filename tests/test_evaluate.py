"""`jobs.evaluate` on the local cluster: every set kind through its adapter and the ingest path
(plus the embedded default's test split), text encoders and LLM2CLIP models of both text
towers side by side, problems reported and never fatal, the report files holding what the
job printed, and everything logged to one MLflow run. The metrics themselves are checked
exactly on hand-built matrices in test_metrics.py; here a retrieval figure is recomputed
from the saved model to show the job reports what the model does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.store import Store
from tests.conftest import MODELS_DIR, REPO, ingest_in_process, load_result, run_job_here, write_config

MODELS = {"dir": str(MODELS_DIR), "llm": str(MODELS_DIR / "tiny-llama")}


def _image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def _models(root: Path) -> dict[str, Path]:
    """A random LLM2CLIP on the tiny Llama encoder and one with a CLIP text tower, saved."""
    from pipeline.clip_model import LLM2CLIP, LLM2CLIPConfig
    from pipeline.text_encoder import TextEncoder

    torch.manual_seed(0)
    encoder = TextEncoder.from_pretrained(MODELS_DIR / "tiny-llama")
    llm = LLM2CLIP.build(LLM2CLIPConfig(embed_dim=16, text_dim=encoder.dim, encoder_version=encoder.encoder_version,
                                        text_encoder=str(MODELS_DIR / "tiny-llama")), MODELS_DIR / "tiny-clip-vision")
    clip = LLM2CLIP.build(LLM2CLIPConfig(embed_dim=16, text_tower="clip", text_max_length=16), MODELS_DIR / "tiny-clip-vision",
                          MODELS_DIR / "tiny-clip-text")
    return {"llm": llm.save_pretrained(root / "clip-llm"), "clip": clip.save_pretrained(root / "clip-text")}


def _sets(root: Path) -> list[dict]:
    """Small files of every format, with a missing and a corrupt image in the COCO file."""
    images = root / "images"
    images.mkdir()
    photos = [_image(images / f"img{i}.png", i) for i in range(6)]
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    coco = {"images": [{"id": i, "file_name": p.name} for i, p in enumerate(photos)]
            + [{"id": 90, "file_name": "gone.jpg"}, {"id": 91, "file_name": "corrupt.jpg"}],
            "annotations": [{"image_id": i, "caption": f"photo number {i}, view {v}"} for i in range(6) for v in (1, 2)]
            + [{"image_id": 90, "caption": "lost"}, {"image_id": 91, "caption": "broken"}]}
    (root / "captions.json").write_text(json.dumps(coco))
    (root / "long.jsonl").write_text("".join(
        json.dumps({"image": f"images/img{i}.png", "caption": f"A long description of picture {i}. " * 6}) + "\n" for i in range(4)))
    for cls, seeds in (("red_things", (10, 11, 12)), ("blue_things", (20, 21))):
        (root / "tree" / cls).mkdir(parents=True)
        for s in seeds:
            _image(root / "tree" / cls / f"{s}.png", s)
    (root / "names.txt").write_text("blue thing\nred thing\n")  # sorted folder order: blue_things, red_things
    (root / "pairs.jsonl").write_text("".join(json.dumps({"first": f"a cat number {i}", "second": f"cat {i} again"}) + "\n"
                                              for i in range(3)))
    return [
        {"name": "heldout", "kind": "dataset"},
        {"name": "coco", "kind": "coco", "source": str(root / "captions.json"), "options": {"image_root": str(images)}},
        {"name": "long", "kind": "long", "source": str(root / "long.jsonl"), "options": {"caption_column": "caption"}},
        {"name": "tree", "kind": "folder", "source": str(root / "tree"), "options": {"class_names": str(root / "names.txt")}},
        {"name": "fashion", "kind": "fashion_mnist", "limit": 30},
        {"name": "vqa", "kind": "easy_vqa", "limit": 20},
        {"name": "nothing", "kind": "pairs", "source": str(root / "no-such-file.jsonl")},
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, cluster, models, ray_session):
    root = tmp_path_factory.mktemp("evaluate")
    made = _models(root)
    evaluate = {
        "models": [
            {"ref": str(MODELS_DIR / "tiny-llama"), "name": "tiny-llama"},
            {"ref": str(made["llm"]), "name": "clip-llm"},
            {"ref": str(made["clip"]), "name": "clip-text"},
            # trained on the tiny Llama's embeddings, given the Qwen2 encoder: must fail alone, by encoder_version
            {"ref": str(made["llm"]), "name": "wrong-encoder", "text_encoder": str(MODELS_DIR / "tiny-qwen2")},
        ],
        "sets": _sets(root),
        "cra_sets": ["everyday-pairs", str(root / "pairs.jsonl")],
        "output_dir": str(root / "reports"),
        "precision": "fp32",  # as the figures below are worked out again (the bf16 path runs in test_pipeline)
    }
    config = write_config(root / "eval.yaml", root / "store", cluster, models=MODELS, evaluate=evaluate,
                          embedded={"num_scenes": 30, "image_size": 64})
    ingest_in_process(config)
    summary_path = root / "summary.json"
    out = run_job_here("jobs.evaluate", config, cluster, "--summary-json", str(summary_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = load_result("jobs.evaluate", summary_path)
    return root, made, out.stdout, result, json.loads((Path(result.report_dir) / "results.json").read_text())


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cra(first, second) -> float:
    """Each of the 2N captions queries the other 2N-1 by cosine; a hit when its partner is first."""
    e = _unit(np.concatenate([first, second]))
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    n = len(first)
    return float(np.mean(sims.argmax(1) == np.concatenate([np.arange(n, 2 * n), np.arange(n)])))


def _text_models(made: dict[str, Path]) -> dict:
    """Each evaluated model's text embedding, loaded here, outside the job."""
    from pipeline.baselines import MiniLMEncoder
    from pipeline.clip_model import LLM2CLIP
    from pipeline.text_encoder import TextEncoder

    llm, minilm = TextEncoder.from_pretrained(MODELS_DIR / "tiny-llama"), MiniLMEncoder()
    clips = {name: LLM2CLIP.from_pretrained(made[key]) for name, key in (("clip-llm", "llm"), ("clip-text", "clip"))}
    return {"tiny-llama": llm.encode, "all-MiniLM-L6-v2": minilm.encode} | {n: (lambda t, m=m: m.embed_texts(t).numpy()) for n, m in clips.items()}


def _top1(sims: np.ndarray, hits: np.ndarray) -> float:
    """Recall@1: the best-scoring column of each row is one of its hits."""
    return float(np.mean(hits[np.arange(len(sims)), sims.argmax(1)]))


def test_every_model_and_set_is_in_the_report(evaluated):
    """Every model's CRA, and the LLM2CLIP models' retrieval and zero-shot figures, as worked out
    again here from the saved models and the files (the report's own scoring left out)."""
    from pipeline.clip_model import LLM2CLIP
    from pipeline.cra_sets import builtin_pairs, dataset_pairs
    from pipeline.eval_sets import FASHION_MNIST_CLASSES

    root, made, _, result, results = evaluated
    assert result.models == ["tiny-llama", "clip-llm", "clip-text", "all-MiniLM-L6-v2"]
    rows = {r["model"]: r for r in results["rows"]}
    manifest, captions = Store(str(root / "store"), "manifest"), Store(str(root / "store"), "captions")
    originals_and_dense = pa.concat_tables([captions.read("original"), captions.read("provided")])
    heldout = dataset_pairs(manifest.read("embedded"), originals_and_dense, "test")["short-dense"]
    pairs = [(f"a cat number {i}", f"cat {i} again") for i in range(3)]
    # text encoders: CRA only; LLM2CLIP models: CRA in the joint space
    for model, encode in _text_models(made).items():
        for column, cra_pairs in (("pairs/cra", pairs), ("everyday-pairs/cra", builtin_pairs("everyday-pairs")), ("heldout.short-dense/cra", heldout)):
            expected = _cra(encode([a for a, _ in cra_pairs]), encode([b for _, b in cra_pairs]))
            assert rows[model][column] == pytest.approx(expected, abs=1e-9), (model, column)
    # LLM2CLIP models: long-caption retrieval, and zero-shot on the folder set and Fashion-MNIST
    templates = [t for t in (REPO / "configs" / "zeroshot_templates.txt").read_text().splitlines() if t.strip() and not t.startswith("#")]
    for model, key in (("clip-llm", "llm"), ("clip-text", "clip")):
        clip = LLM2CLIP.from_pretrained(made[key])
        dense = dict(zip(captions.read("provided").column("image_id").to_pylist(), captions.read("provided").column("text").to_pylist()))
        long = [(r["uri"], dense[r["image_id"]]) for r in manifest.read("eval.long").to_pylist()]  # the captions as ingested
        sims = _unit(clip.encode_image([uri for uri, _ in long]).numpy()) @ _unit(clip.embed_texts([text for _, text in long]).numpy()).T
        assert rows[model]["long/i2t_r@1"] == pytest.approx(_top1(sims, np.eye(len(long), dtype=bool)), abs=1e-9), model
        assert rows[model]["long/t2i_r@1"] == pytest.approx(_top1(sims.T, np.eye(len(long), dtype=bool)), abs=1e-9), model
        classes = lambda names: _unit(np.stack([_unit(clip.embed_texts([t.format(c) for t in templates]).numpy()).mean(0) for c in names]))  # noqa: E731
        tree = [(root / "tree" / cls / f"{s}.png", label) for label, (cls, seeds) in enumerate((("blue_things", (20, 21)), ("red_things", (10, 11, 12))))
                for s in seeds]
        scores = _unit(clip.encode_image([p for p, _ in tree]).numpy()) @ classes(["blue thing", "red thing"]).T
        assert rows[model]["tree/top1"] == pytest.approx(np.mean(scores.argmax(1) == [label for _, label in tree]), abs=1e-9), model
        fashion = manifest.read("eval.fashion").to_pylist()
        assert len(fashion) == 30
        scores = _unit(clip.encode_image([r["uri"] for r in fashion]).numpy()) @ classes(FASHION_MNIST_CLASSES).T
        labels = np.array([json.loads(r["metadata"])["label"] for r in fashion])
        top5 = np.argsort(-scores, axis=1)[:, :5]
        assert rows[model]["fashion/top1"] == pytest.approx(np.mean(scores.argmax(1) == labels), abs=1e-9), model
        assert rows[model]["fashion/top5"] == pytest.approx(np.mean([l in t for l, t in zip(labels, top5)]), abs=1e-9), model
        pred = scores.argmax(1)  # balanced accuracy: each class's top-1 recall, averaged over the classes present
        per_class = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
        assert rows[model]["fashion/mean_per_class_recall"] == pytest.approx(np.mean(per_class), abs=1e-9), model
    assert rows["tiny-llama"]["coco/i2t_r@1"] is None and "tree/top5" not in rows["clip-llm"]  # 2 classes: no top-5
    assert rows["all-MiniLM-L6-v2"]["everyday-pairs/cra"] > 0.8  # a real sentence encoder on hand-written pairs
    # chance and protocol beside every figure
    assert results["chance"]["tree/top1"] == 0.5 and results["chance"]["fashion/top5"] == 0.5
    assert results["chance"]["coco/i2t_r@1"] == pytest.approx(2 / 12)  # 2 of 12 captions are an image's
    assert results["chance"]["coco/t2i_r@1"] == pytest.approx(1 / 6)
    assert "6 images, 12 distinct captions" in results["protocols"]["coco"]
    assert "CLIP_benchmark" in results["protocols"]["coco"] and "matched by index" in results["protocols"]["long"]
    assert "12 templates" in results["protocols"]["fashion"] and "2 classes" in results["protocols"]["tree"]
    assert "each of the 6 captions queries the other 5" in results["protocols"]["pairs"]


def test_clip_benchmark_files_hold_the_reported_figures(evaluated):
    """A CLIP_benchmark result file per LLM2CLIP model and retrieval or zero-shot set, keys as in
    CLIP_benchmark's clip_benchmark/cli.py `dump` and metrics/zeroshot_*.py, values those of results.json."""
    _, _, _, result, results = evaluated
    folder = Path(result.report_dir) / "clip_benchmark"
    files = {p.name: json.loads(p.read_text()) for p in folder.iterdir()}
    assert set(files) == {Path(f).name for f in result.files if "/clip_benchmark/" in f}
    rows = {r["model"]: r for r in results["rows"]}
    refs = {m["name"]: m["ref"] for m in results["models"]}
    tasks = {"retrieval": ("zeroshot_retrieval", "i2t_r@1"), "zero_shot": ("zeroshot_classification", "top1")}
    expected = {(s, m, tasks[t][0]) for s, t in results["tasks"].items() if t in tasks  # CRA sets: no counterpart
                for m in rows if rows[m][f"{s}/{tasks[t][1]}"] is not None}
    assert {(d["dataset"], d["model"], d["task"]) for d in files.values()} == expected and len(files) == len(expected)
    assert {m for _, m, _ in expected} == {"clip-llm", "clip-text"} and {"coco", "long", "vqa", "tree", "fashion"} <= {s for s, _, _ in expected}
    for name, d in files.items():
        assert list(d) == ["dataset", "model", "pretrained", "task", "metrics", "language"], name
        assert d["pretrained"] == refs[d["model"]] and d["language"] == "en", name
        row, s = rows[d["model"]], d["dataset"]
        if d["task"] == "zeroshot_retrieval":
            want = {}
            for k in (1, 5, 10):  # image retrieval: each text queries the images
                want |= {f"image_retrieval_recall@{k}": row[f"{s}/t2i_r@{k}"], f"text_retrieval_recall@{k}": row[f"{s}/i2t_r@{k}"]}
        else:
            want = {"acc1": row[f"{s}/top1"], "mean_per_class_recall": row[f"{s}/mean_per_class_recall"]}
            want |= {"acc5": row[f"{s}/top5"]} if f"{s}/top5" in row else {}
        assert d["metrics"] == want and all(0.0 <= v <= 1.0 for v in want.values()), name
    assert set(files["fashion__clip-llm__zeroshot_classification.json"]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert set(files["tree__clip-text__zeroshot_classification.json"]["metrics"]) == {"acc1", "mean_per_class_recall"}


def test_bad_paths_and_a_bad_model_are_reported_not_fatal(evaluated):
    _, _, _, _, results = evaluated
    problems = {(p["set"], Path(p["item"].split(": ")[-1]).name, p["reason"]): p for p in results["problems"]}
    assert ("coco", "gone.jpg", "missing_file") in problems
    assert ("coco", "corrupt.jpg", "not_an_image") in problems
    assert ("nothing", "no-such-file.jsonl", "unreadable_set") in problems
    failed = [p for p in results["problems"] if p["reason"] == "model_failed"]
    assert len(failed) == 1 and failed[0]["item"].startswith("wrong-encoder") and "encoder_version" in failed[0]["detail"]


def test_reported_retrieval_is_what_the_saved_model_does(evaluated):
    root, made, _, _, results = evaluated
    from pipeline.clip_model import LLM2CLIP
    from pipeline.metrics import owner_positives, retrieval_scores

    model = LLM2CLIP.from_pretrained(made["clip"])
    paths = [root / "images" / f"img{i}.png" for i in range(6)]
    texts = [f"photo number {i}, view {v}" for i in range(6) for v in (1, 2)]
    sims = (model.encode_image(paths) @ model.embed_texts(texts).T).numpy()
    expected = retrieval_scores(sims, owner_positives([i for i in range(6) for _ in (1, 2)], 6))
    row = next(r for r in results["rows"] if r["model"] == "clip-text")
    assert {k: row[f"coco/{k}"] for k in expected} == pytest.approx(expected, abs=1e-6)


def test_report_files_hold_the_printed_numbers_and_plots(evaluated):
    _, _, stdout, result, _ = evaluated
    md = (Path(result.report_dir) / "results.md").read_text()
    printed = [line for line in stdout.splitlines() if re.match(r"^\| \S.* \| [0-9.]+ \|", line)]
    assert len(printed) > 20 and all(line in md for line in printed)
    plots = {p.name for p in (Path(result.report_dir) / "plots").iterdir()}
    assert {"cra_before_after.png", "recall_at_k.coco.png", "confusion.clip-llm.fashion.png",
            "similarity.clip-text.heldout.short.png"} <= plots


def test_everything_is_logged_to_one_mlflow_run(evaluated, cluster):
    _, _, _, result, results = evaluated
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    run_id = result.mlflow_run_id
    run = client.get_run(run_id)
    row = next(r for r in results["rows"] if r["model"] == "clip-llm")
    assert run.data.metrics["clip-llm/coco/i2t_r1"] == pytest.approx(row["coco/i2t_r@1"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert {"evaluate/results_table.json", "evaluate/results.md", "evaluate/results.json", "evaluate/plots",
            "evaluate/clip_benchmark"} <= artifacts
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluate/clip_benchmark")}
    assert logged == {p.name for p in (Path(result.report_dir) / "clip_benchmark").iterdir()}
    table = json.loads(Path(client.download_artifacts(run_id, "evaluate/results_table.json")).read_text())
    assert table["columns"][0] == "model" and len(table["data"]) == 4
    assert len(client.list_artifacts(run_id, "evaluate/plots")) >= 4
