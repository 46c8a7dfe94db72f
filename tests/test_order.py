"""Which record each training sample reads: passes without replacement, row-group windows for
parquet (each group decoded about once per pass), no record twice in an optimizer step, and all
of it a pure function of (seed, stage, sample number) for resume and any number of processes."""

import json
from collections import Counter

import pytest

from fusionlm.data.batching.batches import MixtureBatches
from fusionlm.data.sources import MultiSource, open_source
from fusionlm.data.batching.order import PassOrder

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


class Stub:  # drawing samples (sample_at) needs no prompt encoder
    pass


def mixture(source, weights, *, batch_size=8, grad_accum=1, seed=0, stage=0) -> MixtureBatches:
    return MixtureBatches(source, weights, seed=seed, stage=stage, batch_size=batch_size, prompts=Stub(),
                          grad_accum=grad_accum)


def text_lines(path, n: int, prefix: str = "t"):
    path.write_text("".join(json.dumps({"text": f"{prefix}{i}"}) + "\n" for i in range(n)))
    return open_source(str(path), "jsonl")


def parquet_docs(path, groups: int, rows: int):
    docs = [{"text": f"doc {i}"} for i in range(groups * rows)]
    pq.write_table(pa.Table.from_pylist(docs), path, row_group_size=rows)
    return open_source(str(path), "parquet")


def ids_of_step(data: MixtureBatches, step: int) -> list[str]:
    """The sample ids of one optimizer step: every micro-batch and every rank's share."""
    size = data.step_size
    return [data.sample_at(n).id for n in range(step * size, (step + 1) * size)]


# ----------------------------------------------------------------------------- PassOrder


def test_each_pass_is_a_permutation_read_window_by_window():
    groups = [5, 7, 0, 6, 6, 6]  # uneven, one empty
    order = PassOrder(30, groups, seed=("s", 0))
    starts = [sum(groups[:g]) for g in range(len(groups))]
    group_of = {r: g for g, (a, n) in enumerate(zip(starts, groups)) for r in range(a, a + n)}
    passes = [[order.record(p * 30 + i) for i in range(30)] for p in range(3)]
    assert all(sorted(p) == list(range(30)) for p in passes)  # every record once per pass
    assert passes[0] != passes[1] != passes[2]  # a fresh order each pass
    for p in passes:  # read in windows of 2 row groups: a window's records are contiguous in the pass
        seen = [group_of[r] for r in p]
        first_seen = list(dict.fromkeys(seen))  # the 5 non-empty groups in read order
        for k in range(0, len(first_seen), 2):
            pair = set(first_seen[k:k + 2])
            span = [i for i, g in enumerate(seen) if g in pair]
            assert span == list(range(span[0], span[-1] + 1)), seen
    assert PassOrder(30, groups, seed=("s", 0)).record(47) == order.record(47)  # pure: a fresh object agrees


def test_plain_order_without_row_groups():
    order = PassOrder(50, None, seed=1)
    assert sorted(order.record(i) for i in range(50, 100)) == list(range(50))
    with pytest.raises(ValueError, match="row groups of 9 records for a task of 10"):
        PassOrder(10, [4, 5], seed=0)


# ----------------------------------------------------------------------------- issue 12, item 11


def test_streamed_parquet_decodes_each_row_group_about_once_per_pass(tmp_path, monkeypatch):
    """Random draws over the whole file decoded a row group for ~90% of samples; drawing window
    by window decodes each of the 20 groups once per pass (plus a window at a pass boundary)."""
    source = parquet_docs(tmp_path / "docs.parquet", groups=20, rows=16)
    decodes = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, *a, **kw: decodes.append(g) or
                        real(self, g, *a, **kw))
    data = mixture(source, {"interleaved": 1}, batch_size=8)
    samples = [data.sample_at(n) for n in range(2 * 320)]  # two passes
    assert len(decodes) <= 2 * 20 + 4, f"{len(decodes)} decodes for {len(samples)} samples"
    assert Counter(s.id for s in samples[:320]).most_common(1)[0][1] == 1  # a pass draws without replacement


def test_mixed_sources_keep_their_windows(tmp_path, monkeypatch):
    """Another source's draws in between do not evict the parquet window (each source has its cache)."""
    docs = parquet_docs(tmp_path / "docs.parquet", groups=10, rows=16)
    source = MultiSource({"docs": docs, "text": text_lines(tmp_path / "t.jsonl", 30)})
    decodes = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, *a, **kw: decodes.append(g) or
                        real(self, g, *a, **kw))
    data = mixture(source, {"docs": 1, "text": 1})
    drawn = Counter(data.sample_at(n).task for n in range(320))
    assert drawn["interleaved"] > 100 and len(decodes) <= (drawn["interleaved"] // 160 + 1) * 10 + 2


# ----------------------------------------------------------------------------- issue 12, item 7b


def test_a_step_never_holds_a_record_twice(tmp_path):
    """An optimizer step (2 micro-batches of 8, all ranks) draws 16 of 40 records without
    replacement, also when it reaches the end of a pass (it starts the next one instead)."""
    data = mixture(text_lines(tmp_path / "t.jsonl", 40), {"text_only": 1}, batch_size=8, grad_accum=2)
    for step in range(30):
        ids = ids_of_step(data, step)
        assert len(set(ids)) == 16, (step, Counter(ids).most_common(2))
    rank_shares = []  # the same through each rank's batches (world 2: contiguous halves of each micro-batch)
    for rank in (0, 1):
        per_rank = MixtureBatches(data.source, {"text_only": 1}, seed=0, stage=0, batch_size=8, prompts=Stub(),
                                  rank=rank, world=2, grad_accum=2)
        rank_shares += [per_rank.sample_at(k * 8 + rank * 4 + i).id for k in (6, 7) for i in range(4)]
    assert sorted(rank_shares) == sorted(ids_of_step(data, 3))


def test_a_mixture_step_never_holds_a_record_twice(tmp_path):
    source = MultiSource({"a": text_lines(tmp_path / "a.jsonl", 25, "a"),
                          "b": text_lines(tmp_path / "b.jsonl", 12, "b")})
    data = mixture(source, {"a": 2, "b": 1}, batch_size=6)
    for step in range(60):
        ids = ids_of_step(data, step)
        assert len(set(ids)) == len(ids), (step, ids)


def test_a_task_smaller_than_the_step_spreads_its_repeats(tmp_path):
    """3 records, 8 draws a step: each record appears 2 or 3 times, never 1 and 4."""
    data = mixture(text_lines(tmp_path / "t.jsonl", 3), {"text_only": 1}, batch_size=8)
    for step in range(5):
        counts = Counter(ids_of_step(data, step))
        assert len(counts) == 3 and set(counts.values()) <= {2, 3}, counts


# ----------------------------------------------------------------------------- purity


def test_draws_are_a_pure_function_of_the_sample_number(tmp_path):
    """Resume (a fresh object at a late step), out-of-order workers, and the same global batch split
    into micro-batches differently all read the same records."""
    source = MultiSource({"docs": parquet_docs(tmp_path / "d.parquet", groups=6, rows=10),
                          "text": text_lines(tmp_path / "t.jsonl", 17)})
    weights = {"docs": 3, "text": 1}
    straight = mixture(source, weights, batch_size=4)
    want = [straight.sample_at(n).id for n in range(0, 8 * 3000, 97)]
    resumed = mixture(source, weights, batch_size=4)
    assert [resumed.sample_at(n).id for n in reversed(range(0, 8 * 3000, 97))] == want[::-1]
    # batch_size 8 x grad_accum 1 and batch_size 4 x grad_accum 2: the same 8 samples per step
    assert [mixture(source, weights, batch_size=4, grad_accum=2).sample_at(n).id for n in range(400)] == \
           [mixture(source, weights, batch_size=8).sample_at(n).id for n in range(400)]
    assert [s.id for s in map(straight.sample_at, range(50))] != \
           [s.id for s in map(mixture(source, weights, batch_size=4, seed=1).sample_at, range(50))]
