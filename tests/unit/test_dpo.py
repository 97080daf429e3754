"""DPO: the loss as the paper defines it, and the trainer on the tiny model: the reference is
the base, a few steps raise the preferred output's margin, same seed same losses, and a run
resumed from a checkpoint computes the uninterrupted run's losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from genserve.training.dpo import dpo_loss
from genserve.training.messages import Checkpointed, Metrics, Started, WorkerSpec
from tests.tiny_model import CHATML


def test_loss_is_minus_logsigmoid_of_the_beta_scaled_margin() -> None:
    # Two pairs: policy - reference is (chosen 1.0, rejected -0.5) and (chosen -2.0, rejected 0).
    policy = torch.tensor([-3.0, -6.0, -4.5, -4.0])
    reference = torch.tensor([-4.0, -4.0, -4.0, -4.0])
    scores = dpo_loss(policy, reference, beta=0.5)
    margins = [0.5 * (1.0 - -0.5), 0.5 * (-2.0 - 0.0)]
    expected = sum(math.log1p(math.exp(-m)) for m in margins)  # -logsigmoid(m)
    assert float(scores.loss) == pytest.approx(expected, rel=1e-6)
    assert (scores.correct, scores.pairs) == (1, 2)
    assert scores.margin == pytest.approx(sum(margins))
    # A policy that is still the reference knows no preference: log 2 per pair.
    same = dpo_loss(reference, reference, beta=0.1)
    assert float(same.loss) == pytest.approx(2 * math.log(2)) and same.correct == 0


def preference_data(n: int) -> bytes:
    lines = []
    for i in range(n):
        lines.append(
            json.dumps(
                {
                    "input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
                    "preferred_output": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}"}],
                    "non_preferred_output": [{"role": "assistant", "content": "I do not know."}],
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture()
def one_thread():  # noqa: ANN201 - same bits run to run: one thread sums in one order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dpo_spec(tiny_model_dir: Path, tmp_path: Path, name: str, **kw) -> WorkerSpec:  # noqa: ANN003
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        data.write_bytes(preference_data(12))
    fields = dict(
        job_id=name, base_path=str(tiny_model_dir), chat_template=CHATML, train_file=str(data),
        n_epochs=2, batch_size=3, learning_rate=2e-3, seed=1, max_len=128,
        out_dir=str(tmp_path / name), method="dpo", beta=0.1,
    )  # fmt: skip
    return WorkerSpec(**{**fields, **kw})


def run(spec: WorkerSpec) -> tuple[list[dict], list]:
    from genserve.training.trainer import train

    messages: list = []
    messages.append(train(spec, messages.append))
    return [m.data for m in messages if isinstance(m, Metrics)], messages


def test_training_raises_the_preferred_margin(
    tiny_model_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    spec = dpo_spec(tiny_model_dir, tmp_path, "a", valid_file=None)
    metrics, messages = run(spec)
    started = next(m for m in messages if isinstance(m, Started))
    assert (started.examples, started.total_steps) == (12, 8)  # pairs; 4 steps an epoch
    first, last_epoch = metrics[0], metrics[4:]
    # Step 1 runs before any update, and LoRA's B starts at zero: the policy is the reference.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train_mean_reward_margin"] == pytest.approx(0, abs=1e-6)
    assert all(m["train_loss"] < math.log(2) for m in last_epoch)
    assert all(m["train_mean_reward_margin"] > 0 for m in last_epoch)
    assert all(m["train_mean_reward_accuracy"] == 1.0 for m in last_epoch)
    assert "train_mean_token_accuracy" not in first


def test_validation_scores_the_pairs(
    tiny_model_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(preference_data(4))
    spec = dpo_spec(tiny_model_dir, tmp_path, "v", valid_file=str(valid), n_epochs=1)
    metrics, messages = run(spec)
    assert [("valid_loss" in m) for m in metrics] == [False, False, False, True]
    scores = metrics[-1]
    assert 0 < scores["valid_loss"] < math.log(2) and scores["valid_mean_reward_accuracy"] == 1.0
    assert scores["full_valid_loss"] == scores["valid_loss"]
    assert next(m for m in messages if isinstance(m, Checkpointed)).metrics == scores


def test_same_seed_same_losses_and_exact_resume(
    tiny_model_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    losses, messages = run(dpo_spec(tiny_model_dir, tmp_path, "a"))
    assert run(dpo_spec(tiny_model_dir, tmp_path, "b"))[0] == losses
    assert run(dpo_spec(tiny_model_dir, tmp_path, "c", seed=2))[0] != losses
    halfway = next(m for m in messages if isinstance(m, Checkpointed))
    assert halfway.step == 4
    resumed, _ = run(dpo_spec(tiny_model_dir, tmp_path, "d", resume_dir=halfway.path))
    assert resumed == losses[4:]


def test_a_method_refuses_the_other_methods_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    from genserve.training.trainer import TrainingDataError, train

    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
        )
        + "\n"
    )
    with pytest.raises(TrainingDataError, match="a dpo job trains on preference examples"):
        train(dpo_spec(tiny_model_dir, tmp_path, "x", train_file=str(chat)), lambda m: None)
    pairs = dpo_spec(tiny_model_dir, tmp_path, "y").train_file
    supervised = dpo_spec(tiny_model_dir, tmp_path, "y", method="supervised")
    with pytest.raises(TrainingDataError, match="which train with method dpo") as err:
        train(supervised.model_copy(update={"train_file": pairs}), lambda m: None)
    assert err.value.param == "training_file"
