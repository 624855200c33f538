"""Caption clean-up rules, caption versions and chat-template prompts (no engine needed)."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, AutoTokenizer

from pipeline.captioning import Rejected, caption_version, chat_prompt, clean_caption, compression_ratio, fill_instruction, model_fingerprint
from pipeline.config import ConfigError, PostprocessConfig, RecaptionConfig, validate_config
from tests.conftest import MODELS_DIR

RULES = PostprocessConfig()


@pytest.mark.parametrize(
    ("raw", "finish", "expected"),
    [
        ("A red cube sits left of a blue ball.", "stop", "A red cube sits left of a blue ball."),
        ("Sure! Here's a detailed description of the image:\n\nA red cube sits on grass.", "stop", "A red cube sits on grass."),
        ("Assistant: A small grey cat sleeps on a sofa.<|im_end|>", "stop", "A small grey cat sleeps on a sofa."),
        ("**A photo** of a dog.\n- The dog is brown.\n- It runs.", "stop", "A photo of a dog. The dog is brown. It runs."),
        ('"A quiet street at night."', "stop", "A quiet street at night."),
        ("A red cube on the left. A blue ball to the right of the", "length", "A red cube on the left."),
        ("Certainly. A tall green tree stands behind the house.", "stop", "A tall green tree stands behind the house."),
    ],
)
def test_clean_caption_keeps_the_description(raw, finish, expected):
    text, reason, _ = clean_caption(raw, finish, RULES)
    assert (text, reason) == (expected, "")


@pytest.mark.parametrize(
    ("raw", "finish", "reason"),
    [
        ("", "stop", Rejected.EMPTY),
        ("<|im_end|> ", "stop", Rejected.EMPTY),
        ("A cat.", "stop", Rejected.TOO_SHORT),
        ("a red cube next to a red cube next to a red cube " * 8, "stop", Rejected.DEGENERATE),
        ("A red cube sits on the left and a blue ball", "length", Rejected.UNFINISHED),
    ],
)
def test_clean_caption_rejects_with_a_reason(raw, finish, reason):
    assert clean_caption(raw, finish, RULES)[1] == reason


def test_unfinished_policy_is_configurable():
    cut = "A red cube sits on the left and a blue ball"
    assert clean_caption(cut, "length", PostprocessConfig(unfinished="keep"))[:2] == (cut, "")
    assert clean_caption("A red cube. A blue ball.", "length", PostprocessConfig(unfinished="reject"))[1] == Rejected.UNFINISHED


def test_compression_ratio_separates_prose_from_loops():
    prose = "A small red cube sits near the lower left corner, partly hidden by a large blue sphere."
    assert compression_ratio(prose) < 1.5
    assert compression_ratio("the cat " * 40) > 5


def test_caption_version_is_stable_and_changes_with_what_decides_the_text(models):
    model = str(models["smollm2"])
    base = RecaptionConfig(mode="text", prompt="Describe: {caption}")
    version = caption_version(base, model)
    assert version.startswith("text-") and version == caption_version(RecaptionConfig(mode="text", prompt="Describe: {caption}"), model)
    # Engine and throughput settings do not change the text, so not the version.
    assert caption_version(base.model_copy(update={"actors": 4, "batch_size": 7, "kv_cache_bytes": 2**30}), model) == version
    changed = [
        base.model_copy(update={"prompt": "Expand: {caption}"}),
        base.model_copy(update={"sampling": base.sampling.model_copy(update={"max_tokens": 99})}),
        base.model_copy(update={"postprocess": PostprocessConfig(min_words=5)}),
    ]
    assert len({caption_version(c, model) for c in changed} | {version}) == 4
    assert caption_version(base, str(models["tiny-llama"])) != version
    assert model_fingerprint(str(models["smollm2"])).startswith("smollm2-135m-instruct@")


def test_text_mode_prompt_must_use_the_caption():
    with pytest.raises(ConfigError, match=r"prompt: .*\{caption\}"):
        validate_config({"mode": "text", "prompt": "Describe a photo."}, RecaptionConfig, source="recaption")
    with pytest.raises(ConfigError, match="prompt"):
        validate_config({"prompt": "Describe {thing}"}, RecaptionConfig, source="recaption")


def test_prompts_come_from_the_models_chat_template(models):
    tokenizer = AutoTokenizer.from_pretrained(models["smollm2"])
    instruction = fill_instruction("Expand into a dense description: {caption}", ["a red cube", "a cube"])
    prompt = chat_prompt(tokenizer, instruction, None, with_image=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "Expand into a dense description: a red cube" in prompt
    processor = AutoProcessor.from_pretrained(models["tiny-idefics3"])
    prompt = chat_prompt(processor, "Describe this image.", None, with_image=True)
    assert prompt == "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        chat_prompt(tokenizer, "x", None, with_image=False)


def test_max_model_len_fits_the_models_context(models):
    """The default (4096) is capped at a model's own context; a longer value set by the user
    fails on the driver, in one line naming the key (vLLM failed in every actor it started)."""
    from pipeline.captioning import DEFAULT_MAX_MODEL_LEN, fit_context, model_context_length

    short = str(MODELS_DIR / "tiny-llama")
    assert model_context_length(short) == 2048 < DEFAULT_MAX_MODEL_LEN
    assert fit_context(RecaptionConfig(), short).max_model_len == 2048
    assert fit_context(RecaptionConfig(), str(MODELS_DIR / "smollm2-135m-instruct")).max_model_len == DEFAULT_MAX_MODEL_LEN
    assert fit_context(RecaptionConfig(max_model_len=1024), short).max_model_len == 1024
    with pytest.raises(ValueError, match=r"^recaption.max_model_len 4096 is longer than the context of .*tiny-llama \(2048 tokens\)"):
        fit_context(RecaptionConfig(max_model_len=4096), short)
    assert fit_context(RecaptionConfig(), "org/hub-model").max_model_len == DEFAULT_MAX_MODEL_LEN  # unknown: the default
