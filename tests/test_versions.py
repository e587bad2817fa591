"""`VersionedDir`: version names, the atomic link switch and rename-before-delete pruning (recall_hf.versions)."""

from __future__ import annotations

import os
import shutil

import pytest

from recall_hf.versions import VersionedDir, version_number


def make(tmp_path, first=0):
    return VersionedDir(tmp_path / "versions", tmp_path / "current", first=first)


def add(vd: VersionedDir) -> str:
    name = vd.next_name()
    vd.path(name).mkdir(parents=True)
    (vd.path(name) / "config.json").write_text("{}")
    return name


def test_names_count_up_from_first_and_ignore_non_versions(tmp_path):
    vd = make(tmp_path, first=1)
    assert vd.versions() == [] and vd.next_name() == "v0001"
    assert [add(vd), add(vd)] == ["v0001", "v0002"]
    (vd.root / ".v0009.tmp-1").mkdir()
    (vd.root / "notes").mkdir()
    assert vd.versions() == ["v0001", "v0002"] and vd.next_name() == "v0003"
    assert version_number("v10000") == 10000
    with pytest.raises(ValueError, match="not a version name"):
        vd.path("latest")


def test_switch_is_a_relative_symlink_replaced_atomically(tmp_path):
    vd = make(tmp_path)
    a, b = add(vd), add(vd)
    assert vd.current() is None
    vd.switch(a)
    assert vd.current() == a and os.readlink(vd.link) == os.path.join("versions", a)
    vd.switch(b)
    assert vd.current() == b and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(ValueError, match="does not exist"):
        vd.switch("v0042")
    assert vd.current() == b


def test_current_is_none_for_a_link_outside_the_versions(tmp_path):
    vd = make(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    os.symlink("elsewhere", vd.link)
    assert vd.current() is None


def test_prune_renames_before_deleting(tmp_path, monkeypatch):
    vd = make(tmp_path)
    names = [add(vd) for _ in range(3)]
    assert vd.prune(keep={names[-1]}) == names[:2] and vd.versions() == names[-1:]

    older = add(vd)
    def crash(path, *args, **kwargs):
        raise OSError("crash mid-delete")

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(OSError):
        vd.prune(keep={names[-1]})
    # The version's real name is gone at once; what is left is a `*.tmp-*` leftover, never a half version.
    assert older not in vd.versions() and [p.name.split(".")[0] for p in vd.stale()] == [older]


def test_prune_keeps_the_newest_and_never_the_live_version(tmp_path):
    vd = make(tmp_path)
    names = [add(vd) for _ in range(6)]  # v0000..v0005
    vd.switch(names[1])
    assert vd.prune(keep={names[0]}, newest=2) == [names[2], names[3]]
    assert vd.versions() == [names[0], names[1], names[4], names[5]] and vd.current() == names[1]
    assert vd.prune() == [names[0], names[4], names[5]] and vd.versions() == [names[1]]
