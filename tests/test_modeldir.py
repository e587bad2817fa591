"""`recall_hf.modeldir.copy_aux_files`: contents of regular files only; links copied by content, never as links."""

from __future__ import annotations

import os

import pytest

from recall_hf.modeldir import copy_aux_files


def model_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "recall.json").write_text("{}")
    (src / "nested").mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    return src, dst


def test_copies_plain_non_weight_files_only(tmp_path):
    src, dst = model_dir(tmp_path)
    assert copy_aux_files(src, dst) == ["config.json", "tokenizer.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "tokenizer.json"]


def test_link_to_a_regular_file_is_copied_by_content_not_as_a_link(tmp_path):
    # A Hugging Face cache snapshot is a folder of links into blobs/: merging a Hub id must work.
    src, dst = model_dir(tmp_path)
    blob = tmp_path / "blob"
    blob.write_text('{"pad": 0}')
    (src / "special_tokens_map.json").symlink_to(blob)
    assert "special_tokens_map.json" in copy_aux_files(src, dst)
    out = dst / "special_tokens_map.json"
    assert not out.is_symlink() and out.read_text() == '{"pad": 0}'


def test_dangling_symlink_and_fifo_are_refused(tmp_path):
    src, dst = model_dir(tmp_path)
    (src / "vocab.txt").symlink_to(tmp_path / "missing")
    with pytest.raises(ValueError, match="vocab.txt is a dangling link"):
        copy_aux_files(src, dst)
    (src / "vocab.txt").unlink()
    os.mkfifo(src / "merges.txt")
    with pytest.raises(ValueError, match="merges.txt is not a regular file"):
        copy_aux_files(src, dst)  # would block forever if the FIFO were opened


def test_symlink_in_skipped_names_is_ignored(tmp_path):
    src, dst = model_dir(tmp_path)
    (src / ".hidden").symlink_to(tmp_path)
    (src / "adapter_config.json").symlink_to(tmp_path / "missing")
    assert copy_aux_files(src, dst, skip={"adapter_config.json"}) == ["config.json", "tokenizer.json"]
