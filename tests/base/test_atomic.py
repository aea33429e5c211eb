"""Atomic directory writes (checkpoints, streamed compression): all or nothing."""

import pytest

from nnslim.base.atomic import atomic_dir, temp_dir_beside


def test_a_finished_directory_replaces_the_old_one_at_once(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.")
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # still the old one while writing
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("...")
        raise RuntimeError("disk full")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_writers_temporary_is_removed_before_the_next_write(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / ".out.999999999.abc.tmp"  # no process has this id
    dead.mkdir()
    tmp = temp_dir_beside(target)
    assert not dead.exists() and tmp.exists()
