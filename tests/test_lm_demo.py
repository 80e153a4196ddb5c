"""The language-model story (ffr_fast.study.lm): its corpus split, its removal rules on a
model whose layers are known identities, its distillation loss, and a tiny end-to-end run
through the CLI that writes its table, JSON and figures."""
import json

import pytest
import torch

from ffr_fast.study import cli, lm

pytest.importorskip("transformers")

# The smallest story: four layers (the least the two budgets allow), width 8 (head size 2,
# the least rotary embeddings take), one torch thread (as conftest.py sets for every test:
# the run sets the threads it is given). What remains of the end-to-end test's time is
# torch.export: one capture per residual_branches() and per prune() of each arm and rule.
TINY = dict(layers=4, hidden=8, heads=4, kv_heads=2, window=16, batch_size=1, steps=2,
            heal_steps=1, eval_windows=2, generate_tokens=2, threads=1)


def write_text_folder(root, count=40):
    for index in range(count):
        folder = root / f"pkg{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"module{index}.py").write_text(
            f"def function_{index}(x):\n    return x * {index} + {index % 7}\n" * 8)
    (root / "image.bin").write_bytes(bytes([0xff, 0xfe, 0x00, 0x80]))  # not UTF-8 text


def test_the_split_is_by_path_deterministic_and_disjoint(tmp_path):
    write_text_folder(tmp_path)
    first, again = lm.load_corpus("text", str(tmp_path)), lm.load_corpus("text", str(tmp_path))
    assert first.files == again.files and first.sha256 == again.sha256
    assert all(torch.equal(first.splits[s], again.splits[s]) for s in lm.SPLITS)
    every = [path for split in lm.SPLITS for path in first.files[split]]
    assert len(every) == len(set(every)) == 40  # disjoint, and every text file is used
    assert all(first.files[s] for s in lm.SPLITS)
    assert first.skipped == ["image.bin"] and first.describe()["skipped_not_utf8"]
    for split in lm.SPLITS:  # a file's split is a function of its path alone
        assert all(lm.split_of(path) == split for path in first.files[split])
    # a new file moves no other file, and a changed byte changes the checksum
    (tmp_path / "pkg0" / "extra.py").write_text("x = 1\n")
    grown = lm.load_corpus("text", str(tmp_path))
    for split in lm.SPLITS:
        assert set(first.files[split]) <= set(grown.files[split])
    assert grown.sha256 != first.sha256


def test_the_stdlib_corpus_leaves_out_tests_idle_and_installed_packages(tmp_path):
    for path in ("json/decoder.py", "test/test_json.py", "unittest/tests/test_case.py",
                 "idlelib/editor.py", "site-packages/numpy/core.py", "os.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("pass\n")
    kept = [p.relative_to(tmp_path).as_posix() for p in lm.stdlib_files(tmp_path)]
    assert kept == ["json/decoder.py", "os.py"]


def llama_with_identity_layers(layers=6, identities=(2, 3)):
    """A random Llama whose decoder layers `identities` pass their input through exactly
    (their attention and MLP output projections are zero)."""
    model = lm.build_model(lm.LMConfig(**{**TINY, "hidden": 32}), layers, seed=0).eval()
    with torch.no_grad():
        for index in identities:
            layer = model.model.layers[index]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def test_each_removal_rule_picks_its_layers():
    model = llama_with_identity_layers()
    ids = torch.randint(0, lm.VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    plan = lm.layers_to_remove(model, ids, 2)
    assert plan["influence"] == ["model.layers.2", "model.layers.3"]  # influence 0
    assert plan["angular"] == ["model.layers.2", "model.layers.3"]  # input == output
    assert plan["last"] == ["model.layers.4", "model.layers.5"]
    # the angular rule removes a contiguous run: identities at 1 and 4 are not one run,
    # while Block Influence takes them both
    apart = llama_with_identity_layers(identities=(1, 4))
    plan = lm.layers_to_remove(apart, ids, 2)
    assert plan["influence"] == ["model.layers.1", "model.layers.4"]
    first, second = plan["angular"]
    assert int(second.rsplit(".", 1)[1]) == int(first.rsplit(".", 1)[1]) + 1
    with pytest.raises(ValueError, match="cannot remove 6 of 6"):
        lm.layers_to_remove(model, ids, 6)


def test_the_distillation_loss_is_zero_only_for_the_teachers_logits():
    teacher = torch.randn(2, 5, lm.VOCAB, generator=torch.Generator().manual_seed(0))
    assert float(lm.distillation_loss(teacher.clone(), teacher)) == pytest.approx(0, abs=1e-6)
    # a shift of every logit changes no distribution
    assert float(lm.distillation_loss(teacher + 3.0, teacher)) == pytest.approx(0, abs=1e-5)
    student = teacher + 0.5 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
    assert float(lm.distillation_loss(student, teacher)) > 1e-3


def test_bad_settings_are_refused_by_the_cli(tmp_path, capsys):
    assert cli.main(["demo-lm", "--data", "text", "--out", str(tmp_path)]) == 2
    assert "--data text needs --data-root" in capsys.readouterr().err
    assert cli.main(["demo-lm", "--layers", "6", "--out", str(tmp_path)]) == 2
    assert "--layers must be a multiple of 4" in capsys.readouterr().err
    assert cli.main(["demo-lm", "--lrs", "-1", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_a_tiny_run_writes_its_table_json_and_figures(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_text_folder(data)
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    argv = ["demo-lm", "--data", "text", "--data-root", str(data), "--out", str(out),
            "--lrs", "1e-3", "--ffr-weights", "0.01", "--layerdrop-rates", "0.1",
            "--no-progress", *options]
    assert cli.main(argv) == 0
    table = (out / "results.md").read_text()
    for label in ("no regularizer", "FFR", "LayerDrop", "3 layers from scratch",
                  "2 layers from scratch", "distilled"):
        assert label in table
    record = json.loads((out / "seed0.json").read_text())
    cuts = record["arms"]["ffr"]["chosen"]["cuts"]
    assert sorted(cuts) == sorted(f"{f:g}/{r}" for f in lm.REMOVED_FRACTIONS for r in lm.RULES)
    assert all(len(cut["removed"]) == {"0.25": 1, "0.5": 2}[key.split("/")[0]]
               and {"pruned", "finetune", "distill"} <= set(cut) for key, cut in cuts.items())
    assert set(record["generate_tokens_per_s"]) == {"4", "3", "2"}
    assert record["settings"]["corpus"]["sha256"] == lm.load_corpus("text", str(data)).sha256
    assert (out / "frontier.png").stat().st_size > 0 and (out / "flow.png").stat().st_size > 0
    # the same settings again: the seed is read back, not trained again
    written = (out / "seed0.json").stat().st_mtime_ns
    assert cli.main(argv) == 0 and (out / "seed0.json").stat().st_mtime_ns == written
