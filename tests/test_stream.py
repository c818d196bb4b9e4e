"""Streamed traces: disjoint rank/worker slices, loader state round trip, and a shard that
becomes unreadable mid-epoch; a run start hashes each shard once."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from bitnet_kde.data import KDTraceDataModule, split_of
from bitnet_kde.kd import traces as traces_mod
from bitnet_kde.kd.synthetic import BigramTraceSource
from bitnet_kde.kd.traces import TraceValidationError, list_shards, read_traces

VOCAB = 64


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    BigramTraceSource(vocab_size=VOCAB, k=5, num_sequences=90, prompt_len=(2, 4), completion_len=(8, 16),
                      shard_rows=16).write(d)
    return d


def make(trace_dir, rank=0, world=1, **kw):
    args = dict(vocab_size=VOCAB, batch_size=4, num_workers=2, val_fraction=0.25, max_seq_len=64, shuffle_seed=3)
    args.update(kw)
    dm = KDTraceDataModule(str(trace_dir), **args)
    if world > 1:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # what setup reads of a trainer
    dm.setup("fit")
    return dm


def epoch_ids(loader) -> list[list[str]]:
    return [b["ids"] for b in loader]


def test_two_ranks_with_two_workers_see_every_training_row_once_per_epoch(traces):
    all_ids = read_traces(traces).column("id").to_pylist()
    train = sorted(i for i in all_ids if split_of(i, 0.2) == "train")
    assert len(train) % 2 == 0, "the fixture is sized for an even split (no padding)"
    ranks = [make(traces, rank=r, world=2, val_fraction=0.2) for r in range(2)]
    loaders = [dm.train_dataloader() for dm in ranks]
    epochs = []
    for _ in range(2):
        per_rank = [epoch_ids(dl) for dl in loaders]
        assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])  # same number of steps on both ranks
        seen = [i for batches in per_rank for b in batches for i in b]
        assert sorted(seen) == train  # each row exactly once, over both ranks and their workers
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order every epoch
    # validation: each val row once over both ranks, and as many batches on each (every forward of
    # an FSDP run is a collective); an odd count repeats the first row
    val_ids = sorted(i for i in all_ids if split_of(i, 0.2) == "val")
    per_rank = [[b["ids"] for b in dm.val_dataloader()] for dm in ranks]
    assert len(per_rank[0]) == len(per_rank[1])
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(val_ids) and len(seen) == len(val_ids) + len(val_ids) % 2


def test_an_odd_split_is_padded_so_both_ranks_step_equally(traces):
    train = [i for i in read_traces(traces).column("id").to_pylist() if split_of(i, 0.3) == "train"]
    assert len(train) % 2 == 1
    ranks = [make(traces, rank=r, world=2, val_fraction=0.3, batch_size=5) for r in range(2)]
    per_rank = [[i for b in dm.train_dataloader() for i in b["ids"]] for dm in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == (len(train) + 1) // 2
    counts = Counter(per_rank[0] + per_rank[1])
    assert set(counts) == set(train) and sorted(counts.values())[-2:] == [1, 2]  # one row wraps around


def passes(loader, count: int) -> list[list[list[str]]]:
    """The batch ids of `count` consecutive passes over `loader`."""
    return [epoch_ids(loader) for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_resumes_with_the_uninterrupted_batches(traces, workers):
    reference = make(traces, num_workers=workers).train_dataloader()
    ref = passes(reference, 3)
    n = len(ref[0])
    assert n > 2 * workers and all(len(p) == n for p in ref)
    # inside the first epoch; its last step (the other worker has ended its slice); the end of
    # the epoch, before and after the loader has seen it end; the first steps of the second
    # epoch (a worker's state is the one taken when the pass began), and inside it
    for stop, drained in ((3, False), (n - 1, False), (n, False), (n, True), (n + 1, False), (n + 2, False)):
        loader = make(traces, num_workers=workers).train_dataloader()
        got, it = [], iter(loader)
        while len(got) < stop:
            try:
                got.append(next(it)["ids"])
            except StopIteration:
                it = iter(loader)
        if drained:
            assert next(it, None) is None
        state = loader.state_dict()
        resumed = make(traces, num_workers=workers).train_dataloader()
        resumed.load_state_dict(state)
        assert got == [b for p in ref for b in p][:stop]
        epoch, done = divmod(stop - 1, n)  # the pass the last batch came from, and its place in it
        # as the uninterrupted loader goes on: the rest of that pass then the next one, or (once
        # the loader has seen the pass end) the next two
        expected = ref[epoch + 1:epoch + 3] if drained else [ref[epoch][done + 1:], ref[epoch + 1]]
        assert passes(resumed, 2) == expected, (stop, drained)
    # a pass cut short (Lightning's limit_train_batches) moves every worker on to the next epoch
    loader = make(traces, num_workers=workers).train_dataloader()
    it = iter(loader)
    next(it)
    assert passes(loader, 2) == ref[1:]


def test_a_shard_truncated_mid_epoch_stops_naming_it(traces, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(traces, d)
    dm = make(d, shuffle_seed=0)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # the epoch has started: every worker has read its first row group
    for shard in list_shards(d):
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(TraceValidationError, match=r"kd-\w+-\d{5}\.parquet: not a readable Parquet file"):
        for _ in it:
            pass


def count_hashing(monkeypatch) -> Counter:
    """Shard name -> how often its bytes were read to compute a sha256."""
    read = traces_mod._read_sha256
    counts = Counter()

    def counted(path, sink):
        counts[path.name] += 1
        return read(path, sink)

    monkeypatch.setattr(traces_mod, "_read_sha256", counted)
    return counts


def test_a_run_start_hashes_each_shard_once(tmp_path, monkeypatch):
    src = BigramTraceSource(vocab_size=VOCAB, k=5, num_sequences=40, prompt_len=(2, 4), completion_len=(8, 16),
                            shard_rows=10)
    src.write(tmp_path)
    # the shards were written well before the run hashes them (a fresh write is hashed again)
    monkeypatch.setattr(traces_mod, "RACY_NS", 0)
    counts = count_hashing(monkeypatch)
    dm = KDTraceDataModule(str(tmp_path), vocab_size=VOCAB, source=src, num_workers=0, val_fraction=0.25)
    dm.prepare_data()  # the completeness check hashes every shard ...
    dm.setup()  # ... and the scan reuses those hashes
    shards = [s.name for s in list_shards(tmp_path)]
    assert len(shards) == 4 and counts == Counter(shards)


def test_a_shard_changed_after_it_was_hashed_is_hashed_again_and_refused(tmp_path, monkeypatch):
    src = BigramTraceSource(vocab_size=VOCAB, k=5, num_sequences=40, prompt_len=(2, 4), completion_len=(8, 16),
                            shard_rows=10)
    src.write(tmp_path)
    counts = count_hashing(monkeypatch)
    assert src.is_complete(tmp_path)
    shard = list_shards(tmp_path)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # same size, possibly within the same timestamp tick as the hashing
    shard.write_bytes(bytes(data))
    with pytest.raises(TraceValidationError, match=f"{shard.name}: does not match its manifest.json entry"):
        KDTraceDataModule(str(tmp_path), vocab_size=VOCAB, num_workers=0, val_fraction=0.25).setup()
    assert counts[shard.name] == 2
