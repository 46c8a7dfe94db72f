"""How many parquet row groups a streamed run decodes per training sample.

    python experiments/parquet_decodes.py [--groups 20] [--rows 64] [--batches 200] [--batch-size 8] [--world 1]

Writes one OBELICS-style parquet shard (``--groups`` row groups of ``--rows`` interleaved documents,
each with a small JPEG), builds a tiny model's tokenizer, layout and image spec, and draws
``--batches`` training batches through ``MixtureBatches`` exactly as training does (rank 0 of
``--world`` processes). Every call of pyarrow's ``ParquetFile.read_row_group`` (the one place
``ParquetRows`` decodes) is counted; the script prints decodes per sample, and how many
batches hold a record twice.
"""

from __future__ import annotations

import argparse
import copy
import io
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fusionlm.checkpoint import build_model
from fusionlm.config import from_dict, validate
from fusionlm.data.batching.batches import MixtureBatches
from fusionlm.data.pixels.processing import ImageSpec
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.sources import build_source
from fusionlm.recipe import make_tokenizer

TINY = {  # the test suite's tiny model: building it takes about a second
    "model": {
        "encoder": {"kind": "siglip", "image_size": 16, "patch_size": 4, "hidden_size": 32, "num_layers": 1,
                    "num_heads": 2, "intermediate_size": 64},
        "connector": {"kind": "mlp"},
        "llm": {"kind": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                "intermediate_size": 64, "max_length": 128},
        "fusion": {"kind": "unified"},
        "tokenizer": {"vocab_size": 400, "corpus_per_task": 20},
    },
    "stages": [{"name": "s", "train": ["all"], "mixture": {"interleaved": 1}, "steps": 1, "batch_size": 8}],
}


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, 40, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path: Path, groups: int, rows: int) -> Path:
    """``groups`` row groups of ``rows`` documents: text, image, text."""
    docs = [{"texts": [f"document {i} starts", None, f"and ends {i}"], "images": [None, jpeg(i), None]}
            for i in range(groups * rows)]
    pq.write_table(pa.Table.from_pylist(docs), path, row_group_size=rows)
    assert pq.ParquetFile(path).metadata.num_row_groups == groups
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--world", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = copy.deepcopy(TINY)
        recipe["data"] = {"source": str(write_shard(Path(tmp) / "docs.parquet", args.groups, args.rows))}
        config = validate(from_dict(recipe))
        source = build_source(config.data)
        tokenizer = make_tokenizer(config, source)
        model = build_model(config, tokenizer)
        data = MixtureBatches(source, {"interleaved": 1}, seed=0, stage=0, batch_size=args.batch_size,
                              prompts=PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config, root=source.root)),
                              rank=0, world=args.world)
        decodes = 0
        real = pq.ParquetFile.read_row_group

        def counted(self, *a, **kw):  # every row-group decode, whoever asks for it
            nonlocal decodes
            decodes += 1
            return real(self, *a, **kw)

        pq.ParquetFile.read_row_group = counted
        samples = repeats = 0
        try:
            for k in range(args.batches):
                batch = data[k]
                samples += len(batch.sample_ids) + len(batch.skipped)
                repeats += any(n > 1 for n in Counter(batch.sample_ids).values())
        finally:
            pq.ParquetFile.read_row_group = real
    total = args.groups * args.rows
    print(f"{args.groups} row groups x {args.rows} rows ({total} records); {args.batches} batches of "
          f"{args.batch_size // args.world} samples (rank 0 of {args.world}) = {samples} samples, "
          f"{samples * args.world / total:.2f} passes of all ranks")
    print(f"row-group decodes: {decodes}, per sample: {decodes / max(1, samples):.3f}; "
          f"batches holding a record twice: {repeats} of {args.batches}")


if __name__ == "__main__":
    main()
