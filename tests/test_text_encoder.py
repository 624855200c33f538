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


# ---------------------------------------------------------------- batches without padding waste
UNEQUAL = ["x", "a red circle", " ".join(["a long caption about many shapes of many colours"] * 12), "photo of a cat", TEXTS[3]]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last"])
def test_packed_and_sorted_batches_equal_the_padded_ones(models, family, bidirectional, pooling):
    """Every batching path gives each text the embedding it has alone: padded in input order,
    sorted by length, packed several to a row (attention confined to each text), a batch of one."""
    enc = TextEncoder.from_pretrained(models[family], bidirectional=bidirectional, pooling=pooling, instruction="Describe: ")
    alone = np.concatenate([enc.encode([t], batch_size=1) for t in UNEQUAL])
    padded = enc.encode(UNEQUAL, batch_size=len(UNEQUAL), sort_by_length=False)
    sorted_ = enc.encode(UNEQUAL, batch_size=2)
    packed = enc.encode(UNEQUAL, batch_size=len(UNEQUAL), packed=True)
    for got in (padded, sorted_, packed):
        np.testing.assert_allclose(got, alone, atol=2e-5, rtol=1e-4)
    batch = enc.pack(UNEQUAL)
    lengths = [len(x) for x in enc.token_ids(UNEQUAL)]
    assert batch["input_ids"].shape == (2, max(lengths))  # the long text fills a row; the four others share the other
    assert int(batch["attention_mask"].max()) >= 3  # several texts in one row
    np.testing.assert_allclose(enc.encode(UNEQUAL[:1], packed=True), alone[:1], atol=2e-5, rtol=1e-4)


def test_a_batch_of_equal_lengths_takes_the_mask_free_path(tiny):
    from pipeline.text_encoder import model_inputs

    ids = tiny.token_ids(["a red circle", "a red square"])
    assert len(ids[0]) == len(ids[1])
    batch = tiny.collate([[x] for x in ids])
    inputs = model_inputs(batch["attention_mask"], True, tiny.model.config, tiny.model.dtype)
    assert inputs == {"attention_mask": None, "is_causal": False}
    with torch.no_grad():
        free = tiny(**batch)
        full = torch.ones(2, 1, len(ids[0]), len(ids[0]), dtype=torch.bool)  # the 4D mask it replaces
        hidden = tiny.model(input_ids=batch["input_ids"], attention_mask=full, use_cache=False).last_hidden_state
    np.testing.assert_allclose(free.numpy(), hidden.mean(dim=1).numpy(), atol=1e-5, rtol=1e-4)
    assert model_inputs(batch["attention_mask"], False, tiny.model.config, tiny.model.dtype) == {"attention_mask": None, "is_causal": True}


def test_pack_rows_first_fit_decreasing():
    from pipeline.text_encoder import pack_rows

    assert pack_rows([5, 1, 3, 2, 9], 6) == [[4], [0, 1], [2, 3]]
    assert pack_rows([7], 4) == [[0]]  # longer than a row: a row of its own
    assert pack_rows([], 4) == []


def test_pool_by_hand_over_a_packed_row():
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    segments = torch.tensor([[0, 1, 2, 2]])  # padding, a one-token text, a two-token text
    pool_mask = (segments > 0).long()
    assert pool(hidden, pool_mask, "mean", segments).tolist() == [[1.0, 2.0], [4.0, 5.0]]
    assert pool(hidden, pool_mask, "last", segments).tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert torch.allclose(pool(hidden, pool_mask, "weighted_mean", segments), torch.tensor([[1.0, 2.0], [13 / 3, 16 / 3]]))


@pytest.mark.parametrize("negatives", [False, True])
def test_a_packed_training_step_has_the_padded_steps_loss_and_gradients(models, negatives):
    """Stage 1's step: the loss and every LoRA gradient of one packed pass equal those of one
    padded pass per column (and for one pair: a batch of one per column)."""
    from pipeline.config import FinetuneTextConfig
    from pipeline.contrastive import ContrastiveLoss
    from pipeline.finetune import TrainableEncoder, contrastive_loss

    cfg = FinetuneTextConfig.model_validate({"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "precision": "fp32"})
    torch.manual_seed(0)
    encoder = TrainableEncoder(str(models["tiny-llama"]), cfg)
    with torch.no_grad():  # adapters that change the output (peft starts B at zero)
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = {"first": UNEQUAL[:3], "second": [UNEQUAL[3], UNEQUAL[2], UNEQUAL[0]]}
    if negatives:
        batch["negative"] = [UNEQUAL[4], UNEQUAL[1], UNEQUAL[3]]
    results = []
    for packed, rows in ((False, 3), (True, 3), (True, 1)):
        encoder.zero_grad()
        loss = contrastive_loss(encoder, {k: v[:rows] for k, v in batch.items()} if rows == 1 else batch, ContrastiveLoss(50.0),
                                torch.device("cpu"), packed=packed)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}))
    (padded, padded_grads), (packed, packed_grads), _ = results
    assert packed == pytest.approx(padded, rel=1e-5) and padded > 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-3)
    assert any(float(g.abs().max()) > 0 for g in packed_grads.values())
    one_pair_padded = contrastive_loss(encoder, {k: v[:1] for k, v in batch.items()}, ContrastiveLoss(50.0), torch.device("cpu"))
    assert results[2][0] == pytest.approx(float(one_pair_padded), abs=1e-5)


def test_lora_on_the_top_layers_only(models):
    from pipeline.config import FinetuneTextConfig
    from pipeline.finetune import TrainableEncoder

    cfg = FinetuneTextConfig.model_validate({"lora": {"r": 4, "alpha": 8, "top_layers": 1}, "precision": "fp32"})
    encoder = TrainableEncoder(str(models["tiny-llama"]), cfg)
    layers = encoder.peft.get_base_model().config.num_hidden_layers
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in encoder.named_parameters() if p.requires_grad}
    assert adapted == {layers - 1}
    with pytest.raises(ValueError, match="finetune_text.lora.top_layers"):
        TrainableEncoder(str(models["tiny-llama"]), cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"top_layers": layers + 1})}))
