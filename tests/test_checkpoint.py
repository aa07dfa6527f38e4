"""Checkpoints: complete or ignored, exact round trip, safe loading, pruning, failed writes."""

from __future__ import annotations

import errno
import random
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from transformers import AutoConfig, AutoModelForCausalLM

from longtune.trainer import checkpoint as ckpt


def _model(seed: int = 0):
    torch.manual_seed(seed)
    fields = tiny_model_config()
    fields["tie_word_embeddings"] = True  # the SmolLM2 layout: lm_head shares the embedding
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))


def _trained(steps: int = 2):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ids = torch.randint(0, 1000, (1, 16))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _save(tmp_path, step, model, opt, sched, keep_last=None):
    state = ckpt.TrainState(step=step, tokens_seen=step * 16, data={"epoch": 0, "index": step})
    return ckpt.save_checkpoint(tmp_path, state, model, opt, sched, "model: {}\n", keep_last)


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _trained()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = _save(tmp_path, 2, model, opt, sched)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["COMPLETE", "config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.resolved.yaml"]
    )
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    fresh = _model(seed=7)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (1 + s))
    state = ckpt.load_checkpoint(path, fresh, fresh_opt, fresh_sched)

    assert state == ckpt.TrainState(step=2, tokens_seen=32, data={"epoch": 0, "index": 2})
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr(), "tied weights stay tied"
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert fresh_sched.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert (random.random(), np.random.rand()) == expected_draws[:2]
    assert torch.equal(torch.rand(1), expected_draws[2])


def test_incomplete_checkpoint_is_never_loaded(tmp_path):
    model, opt, sched = _trained()
    path = _save(tmp_path, 1, model, opt, sched)
    (path / ckpt.COMPLETE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(path, _model())
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert ckpt.latest_complete(tmp_path) is None


def test_latest_complete_skips_newer_incomplete(tmp_path):
    model, opt, sched = _trained()
    _save(tmp_path, 4, model, opt, sched)
    (tmp_path / "step_8").mkdir()  # a crash between mkdir and the marker
    (tmp_path / "step_x").mkdir()  # not a checkpoint name: ignored
    with pytest.warns(UserWarning, match="step_8"):
        assert ckpt.latest_complete(tmp_path) == tmp_path / "step_4"


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    model, opt, sched = _trained()
    for step in (2, 4, 6):
        _save(tmp_path, step, model, opt, sched, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    (tmp_path / "step_3").mkdir()  # an old incomplete leftover is pruned too
    _save(tmp_path, 8, model, opt, sched, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]


def test_failed_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    good = _save(tmp_path, 2, model, opt, sched, keep_last=1)
    real_save = ckpt._torch_save

    def disk_full(obj, path):
        if path.name == "optimizer.pt":
            real_save(obj, path)  # a partial file exists when the error hits
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        _save(tmp_path, 4, model, opt, sched, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_2"], "no temp folder, no step_4, old one not pruned"
    monkeypatch.undo()
    assert ckpt.load_checkpoint(good, _model()).step == 2


def test_replaces_an_incomplete_folder_of_the_same_step(tmp_path):
    model, opt, sched = _trained()
    stale = tmp_path / "step_4"
    stale.mkdir()
    (stale / "junk").write_text("left by a killed run")
    path = _save(tmp_path, 4, model, opt, sched)
    assert ckpt.is_complete(path) and not (path / "junk").exists()


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, capsys):
    model, opt, sched = _trained()
    path = _save(tmp_path, 2, model, opt, sched)
    torch.save({"state": {}, "param_groups": [], "x": _Exploit()}, path / "optimizer.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ckpt.CheckpointError, match="unreadable"):
            ckpt.load_checkpoint(path, _model(), torch.optim.AdamW(_model().parameters()))
    assert "pwned" not in capsys.readouterr().out


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    model, opt, sched = _trained()
    path = _save(tmp_path, 2, model, opt, sched)
    fields = tiny_model_config()
    fields["num_hidden_layers"] = 3
    other = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
    with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
        ckpt.load_checkpoint(path, other)
