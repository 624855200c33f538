"""The pieces both training stages share (no Ray): schedule, DeepSpeed config, TrainState
and its compact data position, the recipe a run name hashes, caption draws."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.clip_data import draw_caption, order_key, sample_digest
from pipeline.config import FinetuneTextConfig, TrainClipConfig, TrainerSettings
from pipeline.training import ray_data_blocked_seconds
from pipeline.training import SampleSet, TrainState, deepspeed_config, lr_factor, unseen_batches


def test_schedules_warm_up_then_decay_to_zero():
    linear, cosine = lr_factor("linear", 100, 10), lr_factor("cosine", 100, 10)
    assert [linear(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert linear(55) == pytest.approx(0.5) and cosine(55) == pytest.approx(0.5)
    assert cosine(10 + 90 // 4) > linear(10 + 90 // 4)  # cosine stays high longer
    assert linear(100) == 0 and cosine(100) == pytest.approx(0)
    assert lr_factor("cosine", 20, 300)(1) == 1.0  # warm-up is capped at a tenth of the run


def test_deepspeed_config_follows_the_settings():
    tc = TrainClipConfig(precision="fp16", zero_stage=1, grad_clip=5.0)
    ds = deepspeed_config(tc.settings(), tc.optimizer(), tc.precision, micro_batch=32, accum_steps=4)
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 5.0
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]  # dynamic loss scaling
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 4


def test_stage_defaults_and_shared_keys():
    ft, tc = FinetuneTextConfig(), TrainClipConfig()
    assert (ft.lr, ft.zero_stage, ft.warmup_steps) == (2e-4, 2, 300)
    assert (tc.lr, tc.weight_decay, tc.zero_stage, tc.schedule, tc.grad_clip) == (1e-5, 0.05, 1, "cosine", 5.0)  # the authors' recipe
    assert TrainClipConfig(weight_decay=0.1).lr == 1e-5  # a key given keeps the stage's other defaults
    assert isinstance(tc.settings(), TrainerSettings) and tc.settings().zero_stage == 1


def test_the_recipe_leaves_out_resources_outputs_and_evaluation():
    base = TrainClipConfig()
    moved = TrainClipConfig(num_workers=64, use_gpu=True, cpus_per_worker=8, zero_stage=3, checkpoint_every=7, keep_checkpoints=9,
                            max_failures=0, storage_path="s3://bucket/runs", accum_steps=8, gradient_checkpointing=False,
                            register_as=None, eval_captions={"long": "provided"}, val_split="test")
    assert moved.recipe() == base.recipe()
    assert TrainClipConfig(lr=2e-5).recipe() != base.recipe()
    assert not set(TrainerSettings.model_fields) & set(base.recipe())  # a new trainer key can never enter the recipe
    ft = FinetuneTextConfig()
    assert FinetuneTextConfig(num_workers=8, builtin_eval=[], baseline=False, encoder_max_length=64).recipe() == ft.recipe()


def test_sample_set_is_a_compact_exact_position():
    size = 1_000_000
    trained = SampleSet(size)
    trained.add(np.arange(0, 400_000))  # a prefix, as a stream trains it
    trained.add(np.array([500_000, 999_999]))
    blob = json.dumps(trained.to_json())
    assert len(blob) < 2_000  # not a list of ids
    back = SampleSet.from_json(json.loads(blob))
    assert back == trained and len(back) == 400_002 and 999_999 in back and 400_000 not in back
    scattered = SampleSet.of(np.random.default_rng(0).choice(size, size // 2, replace=False), size)
    assert len(json.dumps(scattered.to_json())) < size // 8 * 1.4 + 100  # never more than a bitmap (base64)
    with pytest.raises(IndexError):
        trained.add([size])


def test_train_state_saves_and_loads_as_one_object(tmp_path):
    state = TrainState(100, step=7, epoch=1, epoch_start_step=5, world_size=2, zero_stage=1, reason="final", last_loss=0.5,
                       evaluation={"dense.i2t_r@1": 0.25})
    state.trained.add([3, 4, 99])
    state.save(tmp_path)
    loaded = TrainState.load(tmp_path)
    assert loaded == state and loaded.finished
    loaded.next_epoch()
    assert (loaded.epoch, loaded.epoch_start_step, len(loaded.trained)) == (2, 7, 0)


def test_unseen_batches_take_numpy_batches_and_keep_arrays():
    frames = [{"sample_id": np.arange(i, i + 4), "pixels": np.full((4, 2, 2, 3), i, np.uint8),
               "caption_version": np.array(["a", "b", "a", "b"], dtype=object)} for i in range(0, 12, 4)]
    batches = list(unseen_batches(iter(frames), 3, SampleSet.of([1, 6], 12), id_column="sample_id"))
    assert [b["sample_id"].tolist() for b in batches] == [[0, 2, 3], [4, 5, 7], [8, 9, 10]]
    assert batches[0]["pixels"].shape == (3, 2, 2, 3) and batches[0]["caption_version"] == ["a", "a", "b"]


def test_captions_are_drawn_by_version_weight():
    rng = np.random.default_rng(0)
    versions = ["original", "original", "original", "provided"]
    picks = [draw_caption(versions, {"provided": 0.5, "original": 0.5}, rng) for _ in range(4000)]
    assert abs(np.mean([p == 3 for p in picks]) - 0.5) < 0.03  # half dense, although 3 of 4 captions are short
    assert min(picks.count(i) for i in range(3)) > 500  # the originals uniformly (about 667 each)
    assert all(draw_caption(versions, {"provided": 0.0, "original": 1.0}, rng) < 3 for _ in range(100))
    assert draw_caption(["original"], {"provided": 1.0}, rng) is None


def test_sample_order_and_digest_depend_on_content_only():
    assert order_key(0, "abc") == order_key(0, "abc") != order_key(1, "abc")
    assert sample_digest("img", ["c2", "c1"]) == sample_digest("img", ["c1", "c2"]) != sample_digest("img", ["c1"])


def test_ray_data_blocked_time_is_read_from_the_iterator_stats():
    stats = "Dataset iterator time breakdown:\n    * Total time user thread is blocked by Ray Data iter_batches: 312.5ms\n"
    assert ray_data_blocked_seconds(stats) == pytest.approx(0.3125)
    assert ray_data_blocked_seconds(stats.replace("312.5ms", "2.5s")) == 2.5
    assert ray_data_blocked_seconds("no iteration yet") is None


def test_state_digest_sees_every_tensor_a_resume_restores():
    """Equal after a save/load round trip; different when a parameter, an optimizer moment or
    the lr differs (what a partial load would leave behind); frozen parameters do not count."""
    import torch

    from pipeline.training import state_digest

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        model[0].weight.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, opt

    model, opt = build()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    digest = state_digest(model, opt.state_dict(), [1e-2])
    loaded, loaded_opt = build()
    loaded.load_state_dict(model.state_dict())
    loaded_opt.load_state_dict(opt.state_dict())
    assert state_digest(loaded, loaded_opt.state_dict(), [1e-2]) == digest
    assert state_digest(loaded, loaded_opt.state_dict(), [2e-2]) != digest  # the lr
    fresh, fresh_opt = build()
    fresh.load_state_dict(model.state_dict())  # parameters restored, optimizer not
    assert state_digest(fresh, fresh_opt.state_dict(), [1e-2]) != digest
    with torch.no_grad():
        loaded[0].weight.add_(1.0)  # frozen: not part of what a resume restores
    assert state_digest(loaded, loaded_opt.state_dict(), [1e-2]) == digest
    with torch.no_grad():
        loaded[1].bias.add_(1e-6)
    assert state_digest(loaded, loaded_opt.state_dict(), [1e-2]) != digest
