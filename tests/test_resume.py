"""Checkpoints survive interruption: resume replays the run exactly; unusable checkpoints
get clear errors and are never overwritten."""
from dataclasses import replace

import pytest

from ffr_fast.study import checkpoint, cli, pipeline, train

TINY = train.TrainConfig(epochs=3, max_batches=2, batch_size=16, seed=0, regularizer="slimming",
                         weight=1e-3)


def _interrupt_at(epoch, step):
    def callback(current_epoch, current_step):
        if (current_epoch, current_step) == (epoch, step):
            raise KeyboardInterrupt
    return callback


def test_interrupted_run_resumes_to_the_same_weights(splits, tmp_path):
    whole = train.fit(pipeline.seeded_model(TINY, splits), splits, TINY)
    # Ctrl-C in the middle of the second epoch: the first epoch's checkpoint remains.
    stopped = train.fit(pipeline.seeded_model(TINY, splits), splits, TINY, out_dir=tmp_path,
                        on_batch_end=_interrupt_at(1, 1))
    assert stopped.interrupted and len(stopped.history) == 1
    state = checkpoint.load(tmp_path / checkpoint.FILENAME)
    assert state["epoch"] == 1
    assert train.parameter_digest(checkpoint.build_model(state)) != train.parameter_digest(
        whole.model)
    resumed = train.fit(checkpoint.build_model(state), splits, TINY, out_dir=tmp_path,
                        resume=True)
    assert not resumed.interrupted and len(resumed.history) == TINY.epochs
    assert train.parameter_digest(resumed.model) == train.parameter_digest(whole.model)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]


def test_resume_refuses_a_changed_recipe(splits, tmp_path):
    config = replace(TINY, epochs=1)
    train.fit(pipeline.seeded_model(config, splits), splits, config, out_dir=tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="lr: checkpoint 0.1 vs now 0.5"):
        train.fit(pipeline.seeded_model(config, splits), splits, replace(config, lr=0.5),
                  out_dir=tmp_path, resume=True)


def _tiny_train_args(out):
    return ["train", "--out", str(out), "--epochs", "1", "--max-batches", "1",
            "--batch-size", "16", "--no-progress"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path, capsys, damage):
    assert cli.main(_tiny_train_args(tmp_path)) == 0
    path = tmp_path / checkpoint.FILENAME
    content = path.read_bytes()
    damaged = content[: len(content) // 2] if damage == "truncate" else b"\x00garbage" * 50
    path.write_bytes(damaged)
    capsys.readouterr()
    assert cli.main(_tiny_train_args(tmp_path) + ["--resume"]) == 2
    message = capsys.readouterr().err
    assert "cannot be read: truncated, corrupt" in message and str(path) in message
    assert "left as it is" in message
    assert path.read_bytes() == damaged
    for command in (["prune", "--checkpoint", str(path)],
                    ["bench", str(path)], ["report", str(path)]):
        assert cli.main(command + ["--no-progress"]) == 2
        assert "cannot be read" in capsys.readouterr().err
    assert path.read_bytes() == damaged


def test_checkpoint_with_flipped_bytes_is_refused_by_every_command(tmp_path, capsys):
    assert cli.main(_tiny_train_args(tmp_path)) == 0
    path = tmp_path / checkpoint.FILENAME
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 200] = bytes(b ^ 0xFF for b in content[middle:middle + 200])
    path.write_bytes(bytes(content))
    capsys.readouterr()
    for command in (_tiny_train_args(tmp_path) + ["--resume"],
                    ["prune", "--checkpoint", str(path)],
                    ["finetune", "--checkpoint", str(path), "--out", str(tmp_path / "tuned"),
                     "--epochs", "1", "--max-batches", "1"],
                    ["bench", str(path)], ["report", str(path)]):
        assert cli.main(command + ["--no-progress"]) == 2, command
        message = capsys.readouterr().err
        assert "does not match the SHA-256" in message and str(path) in message, message
    assert path.read_bytes() == bytes(content)
    assert not (tmp_path / "tuned").exists()


def test_a_folder_given_as_checkpoint_names_the_file_inside(tmp_path, capsys):
    assert cli.main(_tiny_train_args(tmp_path)) == 0
    capsys.readouterr()
    assert cli.main(["bench", str(tmp_path), "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert "is a folder" in message and str(tmp_path / checkpoint.FILENAME) in message


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path, capsys):
    assert cli.main(_tiny_train_args(tmp_path)) == 0
    path = tmp_path / checkpoint.FILENAME
    content = path.read_bytes()
    capsys.readouterr()
    assert cli.main(_tiny_train_args(tmp_path)) == 2
    assert "--resume" in capsys.readouterr().err and path.read_bytes() == content


def test_prune_of_a_missing_checkpoint_says_so(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    assert cli.main(["prune", "--checkpoint", str(missing), "--no-progress"]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    assert not missing.parent.exists()


def test_ctrl_c_in_the_cli_exits_130_and_leaves_a_checkpoint(tmp_path, monkeypatch, capsys):
    real_epoch = train._train_epoch

    def epoch_then_ctrl_c(*args):
        if args[-3] == 1:  # the epoch index: Ctrl-C during the second epoch
            raise KeyboardInterrupt
        return real_epoch(*args)

    monkeypatch.setattr(train, "_train_epoch", epoch_then_ctrl_c)
    args = _tiny_train_args(tmp_path)
    args[args.index("--epochs") + 1] = "3"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 130
    assert "resume with --resume" in capsys.readouterr().err
    state = checkpoint.load(tmp_path / checkpoint.FILENAME)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    monkeypatch.setattr(train, "_train_epoch", real_epoch)
    assert cli.main(args + ["--resume"]) == 0
    assert checkpoint.load(tmp_path / checkpoint.FILENAME)["epoch"] == 3
