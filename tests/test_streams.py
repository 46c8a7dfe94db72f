"""Streamed formats (tar shards, parquet, JSON lines, save_to_disk), mixing named sources, `data check`."""

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image

from fusionlm.cli import main
from fusionlm.config import DataConfig, SourceConfig, _validate_sources
from fusionlm.data.sources import streams
from fusionlm.data.batching.batches import MixtureBatches
from fusionlm.data.pixels.images import load_image
from fusionlm.data.sources import MultiSource, open_source
from fusionlm.data.sources import build_source
from fusionlm.errors import ConfigError, SampleError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def jpg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, shards=2, per_shard=3, bad=()):
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                add(tar, f"{key}.jpg", b"<html>not a jpeg</html>" if key in bad else jpg())
                add(tar, f"{key}.txt", f"caption {key}".encode())
                add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return folder


def write_parquet(path, rows, row_group_size=2):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def doc(i, image=None):
    return {"texts": [f"intro {i}", None, f"after {i}"], "images": [None, image or jpg(), None]}


def test_webdataset_round_trip(tmp_path):
    src = open_source(str(write_shards(tmp_path / "shards")))
    assert len(src) == 6 and src.tasks() == ["caption"] and not src.problems
    s = src.get("caption", "train", 4)
    assert s.id == "00001.tar/000010001" and s.text == "<image>caption 000010001" and s.kind == "document"
    assert load_image(s.images[0]).size == (8, 8)


def test_streaming_reads_only_the_record_asked_for(tmp_path, monkeypatch):
    src = open_source(str(write_shards(tmp_path / "shards", shards=8, per_shard=50)))
    reads = []
    real = streams._read_range
    monkeypatch.setattr(streams, "_read_range", lambda p, o, n: reads.append(p) or real(p, o, n))
    s = src.record(5 * 50 + 7)
    assert s.id == "00005.tar/000050007"
    assert set(reads) == {str(tmp_path / "shards" / "00005.tar")} and len(reads) == 3  # its jpg, txt and json
    assert all(len(parts) == 3 for _, _, parts in src.records)  # the index holds offsets, not data


def test_truncated_shard_and_missing_partner(tmp_path):
    folder = write_shards(tmp_path / "shards", shards=1, per_shard=3)
    with tarfile.open(folder / "00001.tar", "w") as tar:
        add(tar, "lonely.txt", b"no image")
    with tarfile.open(folder / "00000.tar") as tar:
        jpg2 = tar.getmember("000000002.jpg")
    data = (folder / "00000.tar").read_bytes()
    (folder / "00000.tar").write_bytes(data[: jpg2.offset_data + jpg2.size // 2])  # cut mid-member
    src = open_source(str(folder), "webdataset")
    assert any("00000.tar: cut in member '000000002.jpg'" in p for p in src.problems)
    assert len(src) == 3  # two whole samples of the cut shard, and the lonely caption
    with pytest.raises(SampleError, match="00001.tar: sample 'lonely'.*missing partner"):
        src.record(len(src) - 1)


def test_parquet_interleaved_round_trip_and_bad_rows(tmp_path):
    rows = [doc(i) for i in range(5)]
    rows[3] = {"texts": ["a", "b"], "images": [None, jpg()]}  # position 1 holds both
    path = write_parquet(tmp_path / "docs.parquet", rows)
    src = open_source(str(path))
    assert len(src) == 5 and len(src.groups) == 3
    s = src.record(1)
    assert s.text == "intro 1\n<image>\nafter 1" and isinstance(s.images[0], bytes)
    with pytest.raises(SampleError, match=r"docs.parquet: row group 1, row 1: position 1"):
        src.record(3)


def test_parquet_image_path_escape_refused(tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", [doc(0, image="../../etc/passwd")])
    with pytest.raises(SampleError, match="escapes the data root"):
        open_source(str(path)).record(0)


def test_text_jsonl_round_trip(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text('{"text": "hello"}\n\n{"text": "world"}\nnot json\n')
    src = build_source(DataConfig(source=str(path)))
    assert len(src) == 3 and src.record(1).text == "world" and src.record(1).id == "text.jsonl/3"
    with pytest.raises(SampleError, match="text.jsonl: line 4: not JSON"):
        src.record(2)


def test_hf_save_to_disk_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": jpg(), "path": None}] * 3, "caption": ["a", "b", "c"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    src = open_source(str(tmp_path / "hf"))
    assert len(src) == 3 and src.record(2).text == "<image>c" and load_image(src.record(2).images[0])


def three_sources(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(7)))
    return {"captions": SourceConfig(path=str(write_shards(tmp_path / "shards"))),
            "docs": SourceConfig(path=str(write_parquet(tmp_path / "docs.parquet", [doc(i) for i in range(4)]))),
            "text": SourceConfig(path=str(text), format="jsonl")}


class Stub:  # MixtureBatches needs none of these to draw samples
    pass


def test_mixture_of_sources_matches_weights(tmp_path):
    source = build_source(DataConfig(sources=three_sources(tmp_path)))
    assert isinstance(source, MultiSource)
    batches = MixtureBatches(source, {"captions": 45, "docs": 45, "text": 10}, seed=0, stage=0, batch_size=8,
                             prompts=Stub())
    drawn = Counter(batches.sample_at(n).task for n in range(4000))
    assert abs(drawn["caption"] / 4000 - 0.45) < 0.03 and abs(drawn["interleaved"] / 4000 - 0.45) < 0.03
    assert abs(drawn["text_only"] / 4000 - 0.10) < 0.02
    assert batches.sample_at(123).id == batches.sample_at(123).id  # a pure function of the sample number


def test_sources_config_validation():
    with pytest.raises(ConfigError, match="data.sources.x.format"):
        _validate_sources(DataConfig(sources={"x": SourceConfig(path="p", format="tfrecord")}))
    with pytest.raises(ConfigError, match="data.sources.y.path"):
        _validate_sources(DataConfig(sources={"y": SourceConfig()}))
    with pytest.raises(ConfigError, match="not both"):
        _validate_sources(DataConfig(source="a.json", sources={"y": SourceConfig(path="p")}))


def test_data_check_reports_problems_and_exits_2(tmp_path, capsys):
    folder = write_shards(tmp_path / "bad", bad={"000000001"})
    rows = [doc(0), {"texts": ["x <image>"], "images": [None]}]
    write_parquet(tmp_path / "bad" / "x.parquet", rows)  # ignored: the folder is read as webdataset
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(folder)])
    assert exit_.value.code == 2
    out = capsys.readouterr().out
    assert "6 samples, 6 images" in out and "000000001" in out and "not a recognised image" in out
    with pytest.raises(SystemExit):
        main(["data", "check", str(write_parquet(tmp_path / "p.parquet", rows)), "--format", "parquet"])
    assert "p.parquet: row group 0, row 1: text has 1 <image> placeholder(s) but 0 image(s)" in capsys.readouterr().out


def test_data_check_clean_exits_0(tmp_path, capsys):
    assert main(["data", "check", str(write_shards(tmp_path / "ok"))]) == 0
    assert "6 samples, 6 images" in capsys.readouterr().out


def test_data_check_finds_samples_over_a_recipes_context(tmp_path, capsys):
    import json

    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    short = {"id": "short", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    long = {"id": "long", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "Describe every detail. " * 60}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "d.json").write_text(json.dumps([short, long]))
    from helpers_train import write_recipe

    recipe = write_recipe(tmp_path / "tiny.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(tmp_path / "d.json"), "--recipe", str(recipe)])
    out = capsys.readouterr().out
    assert exit_.value.code == 2 and "sample long:" in out and "over the context of 128" in out
    assert "sample short" not in out
    assert main(["data", "check", str(tmp_path / "d.json")]) == 0  # without a recipe: no length check
