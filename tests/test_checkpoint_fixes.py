"""Checkpoints: saving under context parallelism, the recorded layout, and pruning the
directories of killed saves."""

import logging

from distributed import run_worker
from megaphi.training.checkpoint import (
    LATEST,
    META,
    _prune,
    normalize_layout,
    prune_incomplete,
    same_layout,
)


def test_checkpoint_saves_and_loads_under_context_parallel_groups(tmp_path):
    """cp=2 process groups on 2 processes (gloo): the model, distributed optimizer and RNG
    shards have one main replica per key (the RNG object used to be keyed by the data-parallel
    rank without CP: a duplicate-key error), and everything round-trips exactly."""
    result = run_worker("cp_save_worker.py", 2, tmp_path / "out.pt", args=[tmp_path / "run"])
    assert result["ok"], result["checks"]
    assert result["meta"]["layout"] == {"tp": 1, "pp": 1, "vpp": None, "cp": 2, "dp": 1}


def test_a_layout_without_cp_is_cp1():
    old = {"tp": 2, "pp": 1, "vpp": None, "dp": 4}  # saved before cp was recorded
    assert normalize_layout(old) == {**old, "cp": 1}
    assert normalize_layout(old) == normalize_layout({**old, "cp": 1})
    assert normalize_layout(old) != normalize_layout({**old, "cp": 2})
    assert normalize_layout({**old, "cp": 2})["cp"] == 2
    assert "cp" not in old  # the caller's dict is left alone
    # load_checkpoint's test: an old checkpoint resumed at cp=1 keeps its RNG states
    assert same_layout(old, {**old, "cp": 1}) and same_layout({**old, "cp": 1}, old)
    assert not same_layout(old, {**old, "cp": 2})
    assert not same_layout(old, {**old, "cp": 1, "tp": 1})


def _iter_dir(root, iteration, complete):
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        (path / META).write_text("{}")
    return path


def test_prune_incomplete_removes_only_killed_saves(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    done4 = _iter_dir(root, 4, complete=True)
    killed2 = _iter_dir(root, 2, complete=False)
    killed8 = _iter_dir(root, 8, complete=False)
    (root / LATEST).write_text("iter_0000004\n")
    (root / "iter_0000009").write_text("not a directory")
    (root / "iter_notes").mkdir()  # not an iteration directory
    with caplog.at_level(logging.INFO, logger="megaphi"):
        removed = prune_incomplete(root)
    assert removed == [killed2, killed8]
    assert not killed2.exists() and not killed8.exists()
    assert (done4 / META).is_file() and (root / "iter_0000009").is_file()
    assert (root / "iter_notes").is_dir()
    assert sum("removed incomplete checkpoint" in r.message for r in caplog.records) == 2
    assert prune_incomplete(root) == []
    assert prune_incomplete(tmp_path / "missing") == []


def test_prune_incomplete_before_an_iteration_and_never_latest(tmp_path):
    root = tmp_path / "checkpoints"
    killed2 = _iter_dir(root, 2, complete=False)
    named = _iter_dir(root, 3, complete=False)  # edited by hand: resume reports it, we keep it
    killed8 = _iter_dir(root, 8, complete=False)
    (root / LATEST).write_text("iter_0000003\n")
    assert prune_incomplete(root, before=8) == [killed2]
    assert named.is_dir() and killed8.is_dir()


def test_prune_after_a_save_keeps_the_newest_complete_ones(tmp_path):
    """After saving step 12 with keep_last=2: steps 8 and 12 stay, step 4 goes, the killed save
    of step 6 goes, the killed save of step 16 (an earlier attempt that got further) stays."""
    root = tmp_path / "checkpoints"
    for it in (4, 8, 12):
        _iter_dir(root, it, complete=True)
    for it in (6, 16):
        _iter_dir(root, it, complete=False)
    _prune(root, keep_last=2, just_saved=12)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000008", "iter_0000012",
                                                      "iter_0000016"]
    _prune(root, keep_last=0, just_saved=20)  # keep every complete one; still drop killed saves
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000008", "iter_0000012"]
