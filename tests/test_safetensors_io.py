from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from recall_hf.safetensors_io import CheckpointReader, StreamingWriter, TensorInfo, read_header


def tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=gen),
        "b.bias": torch.randn(5, generator=gen).to(torch.bfloat16),
        "c.count": torch.tensor(7, dtype=torch.int64),
        "d.weight": torch.randn(2, 2, 2, generator=gen).half(),
    }


def write_stream(out, ts, max_shard_size):
    infos = [TensorInfo(n, "", tuple(t.shape), out) for n, t in ts.items()]
    from recall_hf.safetensors_io import DTYPE_NAMES

    dtypes = {n: DTYPE_NAMES[t.dtype] for n, t in ts.items()}
    writer = StreamingWriter(out, infos, dtypes, max_shard_size)
    for n, t in ts.items():
        writer.write(n, t)
    return writer.finish()


def test_streaming_writer_round_trips_single_file(tmp_path):
    ts = tensors()
    files = write_stream(tmp_path, ts, 10**9)
    assert [f.name for f in files] == ["model.safetensors"]
    loaded = load_file(files[0])
    assert set(loaded) == set(ts)
    for n, t in ts.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t)


def test_streaming_writer_shards_with_index_written(tmp_path):
    ts = tensors()
    files = write_stream(tmp_path, ts, 40)
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ts)
    reader = CheckpointReader(tmp_path)
    for n, t in ts.items():
        assert torch.equal(reader.get(n), t)


def test_writer_refuses_out_of_order_tensor(tmp_path):
    ts = tensors()
    infos = [TensorInfo(n, "", tuple(t.shape), tmp_path) for n, t in ts.items()]
    writer = StreamingWriter(tmp_path, infos, {n: "F32" for n in ts}, 10**9)
    with pytest.raises(RuntimeError, match="expected tensor 'a.weight'"):
        writer.write("b.bias", ts["b.bias"])
    writer.abort()


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tensors() | {"d.weight": torch.zeros(2)}, str(path))
    read_header(path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(path)


def test_index_naming_missing_shard_is_refused(tmp_path):
    write_stream(tmp_path, tensors(), 40)
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(ValueError, match="missing shard"):
        CheckpointReader(tmp_path)


def _point_index_at(model_dir, shard_name):
    """Rewrite the index so its first tensor lives in `shard_name`."""
    path = model_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = shard_name
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "", 7])
def test_index_shard_outside_the_folder_is_refused(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    write_stream(model, tensors(), 40)
    _point_index_at(model, name)
    with pytest.raises(ValueError, match="not a file name inside") as err:
        CheckpointReader(model)
    assert repr(name) in str(err.value) and "\n" not in str(err.value)


def test_index_shard_in_a_linked_folder_is_refused_a_linked_file_is_read(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    write_stream(model, tensors(), 40)
    expected = CheckpointReader(model).get(sorted(CheckpointReader(model).tensors)[0]).clone()
    # A shard that is a link to a regular file (how a Hugging Face cache snapshot stores it) is read by content.
    shard = sorted(model.glob("model-*.safetensors"))[0]
    blob = tmp_path / "blob"
    shard.rename(blob)
    shard.symlink_to(blob)
    assert torch.equal(CheckpointReader(model).get(sorted(CheckpointReader(model).tensors)[0]), expected)
    # A dangling link, or a sub-folder that is a link out of the model folder, is refused.
    blob.rename(tmp_path / "gone")
    with pytest.raises(ValueError, match="a symlink or a path leaving"):
        CheckpointReader(model)
    shard.unlink()
    (model / "sub").symlink_to(tmp_path)
    _point_index_at(model, "sub/gone")
    with pytest.raises(ValueError, match="a symlink or a path leaving"):
        CheckpointReader(model)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8")
def test_float8_tensors_are_read_but_never_fused(tmp_path):
    from recall_hf.compat import check_compatible

    w = (torch.randn(4, 8) * 2).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.5])
    tensors = {"w": w, "w_scale": scale, "b": torch.randn(3).to(torch.float8_e5m2)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert reader.tensors["w"].dtype == "F8_E4M3" and reader.tensors["w"].nbytes == 32
    for name, t in tensors.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))
    with pytest.raises(ValueError, match=r"holds float8 tensors \(F8_E4M3, F8_E5M2\): quantized"):
        check_compatible([reader, CheckpointReader(tmp_path)])
