"""The LLM2CLIP model: adapter, vision tower locking and layer ids, optimizer groups,
save/load, inference API, image transforms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.clip_model import LLM2CLIP, MODEL_CONFIG, LLM2CLIPConfig, TextAdapter, VisionTower
from pipeline.image_transforms import ImageSpec, random_resized_crop, random_resized_crop_box, resize_center_crop, to_pixel_values
from pipeline.text_encoder import TextEncoder

EMBED = 24
TEXTS = ["a red circle", "two small blue squares above a large green triangle", "x"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (41, 57, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (70, 33), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), mode="RGBA")
    return [rgb, gray, rgba]


@pytest.fixture(scope="module")
def llm_model(models) -> LLM2CLIP:
    torch.manual_seed(0)
    return LLM2CLIP.build(LLM2CLIPConfig(embed_dim=EMBED, text_dim=128, encoder_version="enc-test"), models["tiny-clip-vision"])


@pytest.fixture(scope="module")
def clip_model(models) -> LLM2CLIP:
    torch.manual_seed(0)
    config = LLM2CLIPConfig(embed_dim=EMBED, text_tower="clip", text_max_length=16)
    return LLM2CLIP.build(config, models["tiny-siglip-vision"], models["tiny-clip-text"])


# ---------------------------------------------------------------------------- adapter
def test_adapter_structure_and_math():
    torch.manual_seed(0)
    d, e, out = 16, 3, 8
    adapter = TextAdapter(d, blocks=3, expansion=e, embed_dim=out).eval()
    assert len(adapter.blocks) == 3
    shapes = {n: tuple(p.shape) for n, p in adapter.named_parameters()}
    for i in range(3):
        assert shapes[f"blocks.{i}.norm.weight"] == (d,)
        assert shapes[f"blocks.{i}.fc1.weight"] == (e * d, d)
        assert shapes[f"blocks.{i}.fc2.weight"] == (d, e * d)
    assert shapes["norm.weight"] == (d,) and shapes["proj.weight"] == (out, d) and shapes["proj.bias"] == (out,)

    x = torch.randn(5, d)
    # the authors' adapter written out with functional ops
    h = x / x.norm(dim=-1, keepdim=True)
    for i in range(3):
        b = adapter.blocks[i]
        z = F.layer_norm(h, (d,), b.norm.weight, b.norm.bias)
        h = h + F.linear(F.gelu(F.linear(z, b.fc1.weight, b.fc1.bias)), b.fc2.weight, b.fc2.bias)
    expected = F.linear(F.layer_norm(h, (d,), adapter.norm.weight, adapter.norm.bias), adapter.proj.weight, adapter.proj.bias)
    with torch.no_grad():
        got = adapter(x)
        torch.testing.assert_close(got, expected)
        assert got.shape == (5, out)
        # the input is L2-normalised first: its scale does not matter
        torch.testing.assert_close(adapter(37.0 * x), got)


def test_adapter_standardises_its_input_from_split_moments():
    import pyarrow as pa

    from pipeline.clip_data import embedding_moments, standardisation

    rng = np.random.default_rng(0)
    d = 16
    # LLM-like embeddings: a large shared direction and small differences between captions
    x = rng.normal(size=(40, d)) * 0.05 + np.linspace(3, 6, d)
    # moments summed over blocks of a nested (per-sample list) column equal the whole split's
    blocks = [pa.table({"embedding": pa.array([[list(r), list(r * 1.5)] for r in x[i:i + 7]], type=pa.list_(pa.list_(pa.float32())))})
              for i in range(0, 40, 7)]
    stats = standardisation(embedding_moments(b).to_pylist()[0] for b in blocks + [blocks[0].slice(0, 0)])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)  # r and 1.5 r normalise alike
    np.testing.assert_allclose(stats.shift, unit.mean(0), atol=1e-6)
    np.testing.assert_allclose(1 / (np.asarray(stats.scale) * np.sqrt(d)), unit.std(0), rtol=1e-4)

    torch.manual_seed(0)
    adapter = TextAdapter(d, blocks=2, expansion=2, embed_dim=8).eval()
    plain = [p.detach().clone() for p in adapter.parameters()]
    adapter.standardise(stats)
    z = (torch.tensor(unit) - torch.tensor(stats.shift)) * torch.tensor(stats.scale)
    assert abs(float(z.norm(dim=-1).pow(2).mean()) - 1.0) < 1e-3  # unit norm on average
    reference = TextAdapter(d, blocks=2, expansion=2, embed_dim=8).eval()
    with torch.no_grad():
        for p, q in zip(reference.parameters(), plain):
            p.copy_(q)
        # the standardised input through the plain blocks (the reference's own normalisation
        # would rescale z: so apply its blocks by hand)
        h = z.float()
        for block in reference.blocks:
            h = block(h)
        expected = reference.proj(reference.norm(h))
        torch.testing.assert_close(adapter(torch.tensor(x, dtype=torch.float32)), expected, rtol=1e-4, atol=1e-5)
        # the shared direction no longer dominates: standardised captions are far less alike
        cos = F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T
        assert cos[~torch.eye(len(z), dtype=torch.bool)].abs().mean() < 0.5 < float((torch.tensor(unit) @ torch.tensor(unit).T).min())
    with pytest.raises(ValueError, match="dim"):
        TextAdapter(d + 1).standardise(stats)
    with pytest.raises(ValueError, match="no caption embeddings"):
        standardisation([embedding_moments(blocks[0].slice(0, 0)).to_pylist()[0]])


def test_adapter_size_matches_the_paper():
    # ~274M parameters at d = 4096, embed_dim 1280 (REFERENCE.md, Stage 2); meta: no memory
    with torch.device("meta"):
        adapter = TextAdapter(4096, blocks=4, expansion=2, embed_dim=1280)
    d = 4096
    per_block = 2 * d + (d * 2 * d + 2 * d) + (2 * d * d + d)
    expected = 4 * per_block + 2 * d + d * 1280 + 1280
    n = sum(p.numel() for p in adapter.parameters())
    assert n == expected and 273e6 < n < 275e6


# ---------------------------------------------------------------------------- vision tower
def _trainable_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["tiny-clip-vision", "tiny-siglip-vision"])
def test_vision_lock_and_layer_ids(models, name):
    tower = VisionTower.from_pretrained(models[name], embed_dim=EMBED)
    assert tower.num_layers == 2
    names = [n for n, _ in tower.named_parameters()]
    early = {n for n in names if n.startswith(("backbone.embeddings.", "backbone.pre_layrnorm."))}
    layer = {i: {n for n in names if n.startswith(f"backbone.encoder.layers.{i}.")} for i in range(2)}
    late = set(names) - early - layer[0] - layer[1]
    assert early and layer[0] and layer[1] and "proj.weight" in late
    assert any(n.startswith("backbone.post_layernorm.") for n in late)
    for n in names:
        want = 0 if n in early else 1 if n in layer[0] else 2 if n in layer[1] else 3
        assert tower.layer_id(n) == want, n
    assert [set(g) for g in tower.layer_groups()] == [early, layer[0], layer[1], late]

    tower.lock()
    assert _trainable_names(tower) == {"proj.weight"}
    tower.lock(unlocked_groups=1)
    assert _trainable_names(tower) == late
    tower.lock(unlocked_groups=2)
    assert _trainable_names(tower) == late | layer[1]
    tower.lock(unlocked_groups=4)
    assert _trainable_names(tower) == set(names)


def test_vision_tower_from_a_dual_model_directory(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    dual = CLIPModel(CLIPConfig(vision_config={**small, "image_size": 32, "patch_size": 8}, text_config={**small, "vocab_size": 50}))
    dual.save_pretrained(tmp_path)
    tower = VisionTower.from_pretrained(tmp_path, embed_dim=EMBED)
    ref = dual.vision_model.state_dict()
    got = tower.backbone.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_grad_checkpointing_gives_the_same_gradients(models):
    torch.manual_seed(0)
    tower = VisionTower.from_pretrained(models["tiny-clip-vision"], embed_dim=EMBED).train()
    x = torch.randn(2, 3, 32, 32)

    def grads() -> dict[str, torch.Tensor]:
        tower.zero_grad()
        tower(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in tower.named_parameters()}

    plain = grads()
    tower.set_grad_checkpointing(True)
    assert tower.backbone.is_gradient_checkpointing
    checkpointed = grads()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n])


# ---------------------------------------------------------------------------- optimizer groups
def test_param_groups(llm_model):
    model = llm_model
    model.vision.lock(unlocked_groups=3)  # embeddings frozen: they must not appear
    lr, text_lr, wd, decay = 1e-3, 5e-3, 0.05, 0.5
    try:
        groups = model.param_groups(lr, text_lr, wd, decay)
    finally:
        model.vision.lock(unlocked_groups=4)
    by_id = {}
    for g in groups:
        assert g["params"] and isinstance(g["name"], str)
        for p in g["params"]:
            assert id(p) not in by_id, "a parameter in two groups"
            by_id[id(p)] = g
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad} - {n for n in named if n.startswith("vision.backbone.embeddings.")}
    trainable -= {n for n in named if n.startswith("vision.backbone.pre_layrnorm.")}
    assert {n for n, p in named.items() if id(p) in by_id} == trainable

    def group(n: str) -> dict:
        return by_id[id(named[n])]

    # no decay on biases, norms, logit scale; decay on matrices
    for n in ["vision.backbone.encoder.layers.0.mlp.fc1.bias", "vision.backbone.post_layernorm.weight",
              "text.blocks.0.norm.weight", "text.proj.bias", "logit_scale"]:
        assert group(n)["weight_decay"] == 0.0, n
    for n in ["vision.backbone.encoder.layers.0.mlp.fc1.weight", "vision.proj.weight", "text.blocks.3.fc2.weight"]:
        assert group(n)["weight_decay"] == wd, n
    # layer-wise decay: 2 layers, top = 3
    assert group("vision.backbone.encoder.layers.0.mlp.fc1.weight")["lr"] == pytest.approx(lr * decay**2)
    assert group("vision.backbone.encoder.layers.1.mlp.fc1.weight")["lr"] == pytest.approx(lr * decay)
    assert group("vision.backbone.post_layernorm.weight")["lr"] == pytest.approx(lr)
    assert group("vision.proj.weight")["lr"] == pytest.approx(lr)
    assert group("text.blocks.0.fc1.weight")["lr"] == text_lr and group("logit_scale")["lr"] == text_lr
    # and the embeddings, once unlocked, get the smallest lr
    groups = model.param_groups(lr, text_lr, wd, decay)
    emb = next(g for g in groups if any(p is named["vision.backbone.embeddings.patch_embedding.weight"] for p in g["params"]))
    assert emb["lr"] == pytest.approx(lr * decay**3)
    torch.optim.AdamW(groups)  # a valid optimizer spec


def test_clamp_logit_scale(llm_model):
    with torch.no_grad():
        llm_model.logit_scale.fill_(7.0)
        llm_model.clamp_logit_scale_()
        assert llm_model.logit_scale.item() == pytest.approx(math.log(100))
        llm_model.logit_scale.fill_(-1.0)
        llm_model.clamp_logit_scale_()
        assert llm_model.logit_scale.item() == 0.0
        llm_model.logit_scale.fill_(math.log(1 / 0.07))


# ---------------------------------------------------------------------------- forward
def test_forward_features_and_bias(models):
    torch.manual_seed(0)
    config = LLM2CLIPConfig(embed_dim=EMBED, text_dim=128, init_logit_bias=-10.0)
    model = LLM2CLIP.build(config, models["tiny-clip-vision"])
    assert model.config.image_size == 32 and model.config.image_mean[0] == pytest.approx(0.48145466)
    pixels, emb = torch.randn(3, 3, 32, 32), torch.randn(3, 128)
    out = model(pixels, emb)
    assert out.image.dtype == torch.float32 and out.image.shape == (3, EMBED) and out.text.shape == (3, EMBED)
    torch.testing.assert_close(out.image.norm(dim=-1), torch.ones(3))
    assert out.logit_scale.ndim == 0 and out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out.logit_bias.item() == -10.0
    # independent path: backbone pooled output through the projection
    with torch.no_grad():
        pooled = model.vision.backbone(pixel_values=pixels).pooler_output
        torch.testing.assert_close(out.image.detach(), F.normalize(pooled @ model.vision.proj.weight.T, dim=-1))


def test_forward_in_bf16(models):
    torch.manual_seed(0)
    model = LLM2CLIP.build(LLM2CLIPConfig(embed_dim=EMBED, text_dim=128), models["tiny-clip-vision"]).to(torch.bfloat16)
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 128))  # float32 inputs, as a loader gives
    assert out.image.dtype == out.text.dtype == out.logit_scale.dtype == torch.float32
    torch.testing.assert_close(out.text.norm(dim=-1), torch.ones(4))
    logits = out.logit_scale * out.image @ out.text.T
    labels = torch.arange(4)
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    for p in [model.vision.backbone.embeddings.patch_embedding.weight, model.text.blocks[0].fc1.weight, model.logit_scale]:
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad.float()).all()


# ---------------------------------------------------------------------------- clip text tower
def test_clip_tokenize_appends_eos_pads_right_and_truncates(clip_model):
    tower = clip_model.text
    eos = tower.tokenizer.eos_token_id
    long = " ".join(["word"] * 100)
    batch = tower.tokenize(["a cat", long])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 16)  # max_length 16, EOS included
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == eos and mask[0, n0:].sum() == 0 and mask[0, :n0].all()
    assert ids[1, -1] == eos and mask[1].all()
    plain = tower.tokenizer("a cat", add_special_tokens=False)["input_ids"]
    assert ids[0, : n0 - 1].tolist() == plain


def test_clip_text_pools_at_the_appended_eos(clip_model):
    tower = clip_model.text
    feats = clip_model.encode_text(["a cat", TEXTS[1]], normalize=False)
    # independently: the text model's hidden state at the last real position, projected
    ids = tower.tokenizer("a cat", add_special_tokens=False)["input_ids"] + [tower.tokenizer.eos_token_id]
    with torch.no_grad():
        hidden = tower.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    torch.testing.assert_close(feats[0], hidden @ tower.proj.weight.T)
    # padding (right) does not change a text's embedding
    torch.testing.assert_close(clip_model.encode_text(["a cat"], normalize=False)[0], feats[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- save / load
def test_llm_tower_save_and_reload(llm_model, tmp_path):
    llm_model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / MODEL_CONFIG).read_text())
    assert saved["text_dim"] == 128 and saved["encoder_version"] == "enc-test"
    assert (tmp_path / "m" / "vision" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    torch.manual_seed(123)  # reload draws different random init: only loaded weights can match
    loaded = LLM2CLIP.from_pretrained(tmp_path / "m")
    assert loaded.config == llm_model.config
    images, emb = _images(), torch.randn(4, 128)
    torch.testing.assert_close(loaded.encode_image(images), llm_model.encode_image(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.encode_text(emb), llm_model.encode_text(emb), rtol=0, atol=1e-6)
    # the saved image processor does what encode_image does
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tmp_path / "m")
    for img in images:
        hf = np.asarray(processor(img.convert("RGB"), return_tensors="np")["pixel_values"][0])
        np.testing.assert_allclose(to_pixel_values(img.convert("RGB"), loaded.image_spec), hf, atol=1e-5)


def test_standardised_adapter_save_and_reload_and_older_weights(models, tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.clip_data import TextStandardisation

    torch.manual_seed(0)
    model = LLM2CLIP.build(LLM2CLIPConfig(embed_dim=EMBED, text_dim=8, encoder_version="enc-test"), models["tiny-clip-vision"])
    plain_emb = torch.randn(3, 8)
    plain = model.encode_text(plain_emb)
    model.text.standardise(TextStandardisation(shift=tuple([0.1] * 8), scale=tuple(float(v) for v in range(1, 9))))
    model.save_pretrained(tmp_path / "m")
    loaded = LLM2CLIP.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.text.input_scale, torch.arange(1, 9, dtype=torch.float32))
    torch.testing.assert_close(loaded.encode_text(plain_emb), model.encode_text(plain_emb), rtol=0, atol=1e-6)
    assert not torch.allclose(loaded.encode_text(plain_emb), plain)
    # weights saved before the adapter standardised: they load, as the identity
    weights = tmp_path / "m" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if ".input_" not in k}, str(weights))
    older = LLM2CLIP.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(older.encode_text(plain_emb), plain, rtol=0, atol=1e-6)


def test_clip_tower_save_and_reload(clip_model, tmp_path):
    clip_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "text" / "config.json").is_file() and (tmp_path / "m" / "text" / "tokenizer.json").is_file()
    torch.manual_seed(123)
    loaded = LLM2CLIP.from_pretrained(tmp_path / "m")
    images = _images()
    torch.testing.assert_close(loaded.encode_image(images), clip_model.encode_image(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.encode_text(TEXTS), clip_model.encode_text(TEXTS), rtol=0, atol=1e-6)
    assert loaded.score(images, TEXTS).shape == (3, 3)


def test_config_round_trip_and_validation():
    config = LLM2CLIPConfig(embed_dim=8, text_dim=16, image_size=32, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    assert LLM2CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown"):
        LLM2CLIPConfig.from_dict({**config.to_dict(), "surprise": 1})
    with pytest.raises(ValueError, match="text_dim"):
        LLM2CLIPConfig(embed_dim=8).validate()


# ---------------------------------------------------------------------------- inference API
def test_encode_text_rejects_a_wrong_dim(llm_model):
    with pytest.raises(ValueError) as err:
        llm_model.encode_text(np.zeros((2, 127), dtype=np.float16))
    assert "127" in str(err.value) and "128" in str(err.value) and "enc-test" in str(err.value)
    # any float dtype of the right dim is fine
    assert llm_model.encode_text(np.zeros((2, 128), dtype=np.float16) + 1).shape == (2, EMBED)


def test_score_embeds_raw_text_with_the_recorded_encoder(models):
    encoder = TextEncoder.from_pretrained(models["tiny-llama"])
    assert encoder.dim == 128
    torch.manual_seed(0)
    config = LLM2CLIPConfig(
        embed_dim=EMBED, text_dim=encoder.dim, encoder_version=encoder.encoder_version, text_encoder=str(models["tiny-llama"])
    )
    model = LLM2CLIP.build(config, models["tiny-clip-vision"])
    images = _images()[:2]
    sims = model.score(images, TEXTS)  # loads config.text_encoder itself
    assert sims.shape == (2, 3) and sims.dtype == torch.float32
    # independently: the training forward on the same pixels and LLM embeddings
    pixels = torch.from_numpy(np.stack([to_pixel_values(img, model.image_spec) for img in images]))
    emb = torch.from_numpy(encoder.encode(TEXTS))
    with torch.no_grad():
        out = model.eval()(pixels[[0, 1, 0]], emb)
    torch.testing.assert_close(sims, out.image[:2] @ out.text.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.score(images, TEXTS, text_encoder=encoder), sims, atol=1e-5, rtol=1e-5)

    other = TextEncoder.from_pretrained(models["tiny-llama"], pooling="last")
    assert other.dim == 128 and other.encoder_version != encoder.encoder_version
    with pytest.raises(ValueError) as err:
        model.score(images, TEXTS, text_encoder=other)
    assert encoder.encoder_version in str(err.value) and other.encoder_version in str(err.value)


# ---------------------------------------------------------------------------- image transforms
def test_image_spec_from_processor(models):
    clip = ImageSpec.from_processor(models["tiny-clip-vision"])
    assert clip.size == 32 and clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    siglip = ImageSpec.from_processor(models["tiny-siglip-vision"])
    assert siglip == ImageSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert ImageSpec.from_processor(models["small-clip-vision"]).size == 64


def test_random_resized_crop_boxes():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(300):
        # aspect ratios inside `ratio`, where a 90% crop always exists (else: central fallback)
        width = int(rng.integers(40, 400))
        height = int(np.clip(round(width / rng.uniform(3 / 4, 4 / 3)), width * 3 / 4 + 1, width * 4 / 3 - 1))
        left, top, w, h = random_resized_crop_box(width, height, (0.9, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # rounding w and h to pixels may lose up to half a pixel on each side
        assert w * h >= 0.9 * width * height - (w + h) / 2 - 0.25
        fractions.append(w * h / (width * height))
    assert min(fractions) < 0.93 and max(fractions) > 0.97  # the scale range is used
    # fallback: no crop of 90% area fits a 1000x10 strip at ratio <= 4/3 -> central crop
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == ((1000 - 13) // 2, 0, 13, 10)


def test_random_resized_crop_output():
    arr = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = random_resized_crop(img, 48, rng=np.random.default_rng(7))
    assert out.size == (48, 48) and out.mode == "RGB"
    left, top, w, h = random_resized_crop_box(90, 60, rng=np.random.default_rng(7))
    expected = Image.fromarray(arr[top : top + h, left : left + w]).resize((48, 48), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_resize_center_crop_and_pixel_values():
    spec = ImageSpec(16, (0.5, 0.25, 0.125), (0.5, 0.25, 0.125))
    # a solid colour survives resize/crop: exact normalised values per channel
    img = Image.new("RGB", (40, 23), (255, 0, 128))
    x = to_pixel_values(img, spec)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    want = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (128 / 255 - 0.125) / 0.125]
    for c in range(3):
        np.testing.assert_allclose(x[c], want[c], rtol=1e-6)
    # centre crop: left and right halves of a two-colour image keep their order and balance
    two = Image.new("RGB", (64, 32), (0, 0, 0))
    two.paste((255, 255, 255), (32, 0, 64, 32))
    out = np.asarray(resize_center_crop(two, 16))
    assert out.shape == (16, 16, 3) and out[:, :7].max() == 0 and out[:, 9:].min() == 255
    # any mode: grayscale, palette, alpha
    for mode in ["L", "P", "RGBA", "I;16"]:
        assert to_pixel_values(Image.new(mode, (20, 30)), spec).shape == (3, 16, 16)


def test_pixel_values_match_the_hf_processor(models):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(models["tiny-clip-vision"])
    spec = ImageSpec.from_processor(processor)
    rng = np.random.default_rng(0)
    for w, h in [(50, 41), (33, 97), (32, 32)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        hf = np.asarray(processor(img, return_tensors="np")["pixel_values"][0])
        np.testing.assert_allclose(to_pixel_values(img, spec), hf, atol=1e-5)
