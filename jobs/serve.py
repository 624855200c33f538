"""Serve a trained model: embeddings and search over one dataset's images on Ray Serve, with a page.

    python -m jobs.serve --config configs/local.yaml [--set serve.model=models:/llm2clip-model@current]
"""

from pipeline.stages.jobkit import job_main
from pipeline.stages.serve import run_serve

EPILOG = """\
Builds (or tops up) the image index of serve.dataset with the model, then deploys the Serve
application and returns; it keeps serving until `serve shutdown`. Deploying again after the
model's alias moved rolls the replicas over to the new version while the others answer.
The bearer token: $LLM2CLIP_SERVE_TOKEN, serve.token_file, or a new one in {run_dir}/serve/token.
Endpoints: GET / (the page), GET /health, POST /embed/text, POST /embed/image, POST /search.
"""

main = job_main("serve", run_serve, epilog=EPILOG)

if __name__ == "__main__":
    raise SystemExit(main())
