"""One path rule for every reader: a path's real path must stay inside the data root (absolute or
relative alike), and an escape is always a SampleError naming the path."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fusionlm.data.sources.formats import read_llava_json, read_qa_jsonl
from fusionlm.data.pixels.images import load_image
from fusionlm.data.pixels.paths import resolve_under
from fusionlm.data.sources import open_source
from fusionlm.errors import SampleError


@pytest.fixture
def root(tmp_path):
    inside = tmp_path / "root"
    (inside / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4), (0, 200, 0)).save(inside / "sub" / "ok.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", inside / "link.png")
    return inside


def readers(root):
    """Each way a path reaches fusionlm, as a function of the path."""
    def llava(path):
        f = root / "data.json"
        f.write_text(json.dumps([{"id": "a", "image": path, "conversations": [
            {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}]))
        return read_llava_json(f)[0].images[0]

    def qa(path):
        f = root / "q.jsonl"
        f.write_text(json.dumps({"id": "a", "image": path, "question": "<image>?", "answer": "x"}) + "\n")
        return read_qa_jsonl(f)[0].images[0]

    def parquet(path):
        f = root / "docs.parquet"
        pq.write_table(pa.Table.from_pylist([{"texts": ["t", None], "images": [None, path]}]), f)
        return open_source(str(f)).record(0).images[0]

    return {"load_image": lambda p: load_image(p, root=root) and resolve_under(p, root),
            "llava": llava, "qa": qa, "parquet": parquet}


@pytest.mark.parametrize("reader", ["load_image", "llava", "qa", "parquet"])
def test_one_rule_everywhere(root, reader):
    read = readers(root)[reader]
    good = os.path.realpath(root / "sub" / "ok.png")
    assert read("sub/ok.png") == good
    assert read(str(root / "sub" / "ok.png")) == good  # absolute, but inside the root
    for bad in ("../secret.png", str(root.parent / "secret.png"), "link.png", "sub/../../secret.png"):
        with pytest.raises(SampleError, match=f"image path '{bad}' escapes the data root"):
            read(bad)
