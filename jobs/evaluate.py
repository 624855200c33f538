"""Evaluate text encoders and LLM2CLIP models side by side: CRA, short- and long-caption
retrieval, zero-shot classification; a Markdown/JSON report with plots, logged to MLflow.

    python -m jobs.evaluate --config configs/local.yaml --set "evaluate.models=[MODEL, ...]"
"""

from pipeline.stages.evaluate import plan_evaluate, run_evaluate
from pipeline.stages.jobkit import job_main

EPILOG = """\
models: text encoders (path, hub id, MLflow URI), LLM2CLIP models from train-clip (path or
MLflow URI, e.g. models:/llm2clip-model@current), or `minilm`. Sets: a dataset in the stores
(kind dataset), or your files through an adapter. On a cluster, COCO and Flickr30k:

  ray job submit --working-dir . -- python -m jobs.evaluate --config configs/llama3-8b-eva02.yaml \\
    --set "evaluate.models=[models:/llm2clip-model@current, models:/llm2clip-text-encoder/1]" \\
    --set "evaluate.sets=[{name: coco5k, kind: karpathy, source: /shared/coco/dataset_coco.json,
           options: {image_root: /shared/coco/images}},
           {name: flickr1k, kind: karpathy, source: /shared/flickr30k/dataset_flickr30k.json,
           options: {image_root: /shared/flickr30k/images}},
           {name: coco-val, kind: coco, source: /shared/coco/annotations/captions_val2017.json,
           options: {image_root: /shared/coco/val2017}},
           {name: imagenet, kind: folder, source: /shared/imagenet/val, options: {class_names: /shared/imagenet/names.txt}}]"

The report (results.md, results.json, plots/) is written under evaluate.output_dir (default
{run_dir}/evaluate) and logged to the MLflow run; the tables are printed at the end.
"""

main = job_main("evaluate", run_evaluate, epilog=EPILOG, plan=plan_evaluate)

if __name__ == "__main__":
    raise SystemExit(main())
