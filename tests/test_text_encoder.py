"""The LLM2Vec-style text encoder: attention modes, pooling, invariances, save/load, LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.text_encoder import TextEncoder, pool

TEXTS = [
    "a red circle",
    "two small blue squares above a large green triangle on a grey background",
    "photo of a cat",
    "The image shows four objects on a plain cyan background. There is a large green triangle on the right.",
    "x",
]


@pytest.fixture(scope="module")
def tiny(models):
    return TextEncoder.from_pretrained(models["tiny-llama"])


def _states(enc: TextEncoder, text: str) -> torch.Tensor:
    batch = enc.tokenize([text])
    with torch.no_grad():
        return enc.token_states(batch["input_ids"], batch["attention_mask"])[0]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_bidirectional_lets_early_tokens_see_later_ones(models, family):
    causal = TextEncoder.from_pretrained(models[family], bidirectional=False)
    bidir = TextEncoder.from_pretrained(models[family], bidirectional=True)
    a, b = "the cat sat on the red mat", "the cat sat on the blue mat"
    # same first tokens, different later token
    assert torch.allclose(_states(causal, a)[:3], _states(causal, b)[:3], atol=1e-6)
    assert not torch.allclose(_states(bidir, a)[:3], _states(bidir, b)[:3], atol=1e-4)
    # and the first token's own output changes once attention is bidirectional
    assert not torch.allclose(_states(causal, a)[0], _states(bidir, a)[0], atol=1e-4)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_does_not_change_embeddings(tiny, bidirectional):
    enc = TextEncoder(tiny.model, tiny.tokenizer, tiny.options.__class__(bidirectional=bidirectional))
    alone = enc.encode(["a red circle"], batch_size=1)
    padded = enc.encode(["a red circle", TEXTS[3]], batch_size=2, sort_by_length=False)[:1]
    np.testing.assert_allclose(alone, padded, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last"])
def test_encode_is_batch_size_invariant(models, pooling):
    enc = TextEncoder.from_pretrained(models["tiny-qwen2"], pooling=pooling)
    one = enc.encode(TEXTS, batch_size=1)
    many = enc.encode(TEXTS, batch_size=3)
    unsorted = enc.encode(TEXTS, batch_size=5, sort_by_length=False)
    np.testing.assert_allclose(one, many, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(one, unsorted, atol=1e-5, rtol=1e-4)
    assert one.dtype == np.float32 and one.shape == (len(TEXTS), enc.dim)


def test_instruction_is_excluded_from_pooling(models):
    instruction = "Retrieve the caption that describes the same image: "
    enc = TextEncoder.from_pretrained(models["tiny-llama"], bidirectional=False, instruction=instruction)
    batch = enc.tokenize(["a red circle", TEXTS[1]])
    n_instr = len(enc.tokenizer(instruction)["input_ids"])
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        pooled = batch["pool_mask"][row].bool()
        assert pooled.sum() == real.sum() - n_instr
        first_real = int(real.nonzero()[0])
        assert not pooled[first_real : first_real + n_instr].any() and pooled[first_real + n_instr :].all()
    # the embedding is the mean over the text tokens only
    with torch.no_grad():
        states = enc.token_states(batch["input_ids"], batch["attention_mask"])
    manual = states[0][batch["pool_mask"][0].bool()].float().mean(0)
    np.testing.assert_allclose(enc.encode(["a red circle"])[0], manual.numpy(), atol=1e-5, rtol=1e-4)


def test_pool_by_hand():
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]]])
    mask = torch.tensor([[0, 1, 1]])  # left padding
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "last").tolist() == [[3.0, 4.0]]
    w = pool(hidden, mask, "weighted_mean")  # weights 1/3, 2/3
    assert torch.allclose(w, torch.tensor([[7 / 3, 10 / 3]]))


def test_normalize_and_empty(tiny):
    emb = tiny.encode(TEXTS[:2], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert tiny.encode([]).shape == (0, tiny.dim)


def test_save_reload_and_versions(tiny, tmp_path, models):
    enc = TextEncoder.from_pretrained(models["tiny-llama"], pooling="weighted_mean", bidirectional=False, max_length=64)
    enc.save_pretrained(tmp_path / "enc")
    again = TextEncoder.from_pretrained(tmp_path / "enc")
    assert again.options == enc.options
    assert again.encoder_version == enc.encoder_version
    np.testing.assert_allclose(again.encode(TEXTS), enc.encode(TEXTS), atol=1e-6)
    versions = {
        tiny.encoder_version,
        enc.encoder_version,
        TextEncoder.from_pretrained(models["tiny-llama"], bidirectional=False).encoder_version,
        TextEncoder.from_pretrained(models["tiny-qwen2"]).encoder_version,
    }
    assert len(versions) == 4  # pooling, attention mode and weights each change the version


def test_lora_adapters_are_merged(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(models["tiny-llama"])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    plain = TextEncoder.from_pretrained(models["tiny-llama"])
    merged = TextEncoder.from_pretrained(models["tiny-llama"], lora=tmp_path / "adapter")
    unmerged = TextEncoder(peft_model.eval(), plain.tokenizer, plain.options)
    assert not np.allclose(plain.encode(TEXTS), merged.encode(TEXTS), atol=1e-4)
    np.testing.assert_allclose(merged.encode(TEXTS), unmerged.encode(TEXTS), atol=1e-4, rtol=1e-3)
    assert merged.encoder_version != plain.encoder_version
