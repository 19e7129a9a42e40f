"""ShardLoader: DDP partitioning, seeded order, exact resume, flips, streaming."""

import threading

import numpy as np
import pytest
import torch

from diffusion.data import ShardLoader, open_dataset, storage
from diffusion.data.shards import Manifest, write_manifest, write_split
from diffusion.images import to_model_range


def _make(root, n=103, shard_size=10):
    """n examples of shape [1, 1, 3]: label = id; pixels (id % 200, 250, 10), so a flip
    shows as (10, 250, id % 200)."""
    ids = np.arange(n)
    images = np.stack([ids % 200, np.full(n, 250), np.full(n, 10)], 1).astype(np.uint8)
    images = images.reshape(n, 1, 1, 3)  # [n, C, H, W]
    fs, path = storage.resolve(str(root))
    info = write_split(fs, path, "toy", "train", (1, 1, 3), [(images, ids)], shard_size=shard_size)
    write_manifest(fs, path, Manifest(dataset="toy", splits={"train": info}))
    return str(root)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("toy"))


def _labels(loader):
    return [y.tolist() for _, y in loader]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_example_at_most_once_and_equal_batch_counts(toy, world_size, drop_last):
    per_rank = []
    for rank in range(world_size):
        loader = ShardLoader(
            toy, "train", 8, rank=rank, world_size=world_size, seed=3, drop_last=drop_last
        )
        batches = _labels(loader)
        assert len(batches) == len(loader)
        assert sum(map(len, batches)) == loader.examples_per_epoch
        per_rank.append([i for b in batches for i in b])
    assert len({len(ids) for ids in per_rank}) == 1  # same batches on every rank
    seen = [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen))  # never twice
    expected = world_size * (103 // world_size)
    if drop_last:
        expected = world_size * ((103 // world_size) // 8 * 8)
    assert len(seen) == expected


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_example_exactly_once_when_divisible(tmp_path, world_size):
    uri = _make(tmp_path, n=96, shard_size=7)
    seen = []
    for rank in range(world_size):
        loader = ShardLoader(
            uri, "train", 5, rank=rank, world_size=world_size, seed=0, drop_last=False
        )
        seen += [i for b in _labels(loader) for i in b]
    assert sorted(seen) == list(range(96))


def test_rank_blocks_are_pieces_of_one_stream(toy):
    """The epoch order does not depend on the world size: ranks take consecutive blocks."""
    whole = [
        i
        for b in _labels(
            ShardLoader(toy, "train", 4, rank=0, world_size=1, seed=5, drop_last=False)
        )
        for i in b
    ]
    parts = []
    for rank in range(3):
        loader = ShardLoader(toy, "train", 4, rank=rank, world_size=3, seed=5, drop_last=False)
        parts += [i for b in _labels(loader) for i in b]
    assert parts == whole[: len(parts)]


def test_order_depends_on_seed_and_epoch_only(toy):
    def epochs(seed, n=2):
        loader = ShardLoader(toy, "train", 8, rank=0, world_size=1, seed=seed)
        return [_labels(loader) for _ in range(n)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert a == b
    assert a[0] != c[0]
    assert a[0] != a[1]  # a new epoch is reshuffled
    flat = [i for batch in a[0] for i in batch]
    assert flat != sorted(flat)  # shuffled


def test_values_are_model_range_of_stored_pixels(toy):
    images, _ = open_dataset(toy).load_split("train")
    loader = ShardLoader(toy, "train", 16, rank=0, world_size=1, seed=0)
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (16, 1, 1, 3)
        torch.testing.assert_close(x, to_model_range(images[y.numpy()]), rtol=0, atol=0)


def _run(loader, n_batches):
    out = []
    it = loader.batches()
    for _ in range(n_batches):
        out.append(next(it))
    return out


@pytest.mark.parametrize("stop", [0, 1, 3, 12, 13, 14, 20])  # 12 batches per epoch
@pytest.mark.parametrize("flip", [False, True])
def test_resume_reproduces_the_uninterrupted_stream(toy, stop, flip):
    kwargs = dict(rank=1, world_size=2, seed=7, flip=flip, drop_last=False)
    reference = _run(ShardLoader(toy, "train", 4, **kwargs), 30)
    first = ShardLoader(toy, "train", 4, **kwargs)
    _run(first, stop)
    state = first.state_dict()
    resumed = ShardLoader(toy, "train", 4, **kwargs)
    resumed.load_state_dict(state)
    for (x, y), (x_ref, y_ref) in zip(_run(resumed, 30 - stop), reference[stop:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_state_names_the_next_batch_and_rolls_over_at_epoch_end(toy):
    loader = ShardLoader(toy, "train", 10, rank=0, world_size=2, seed=0, drop_last=False)
    assert len(loader) == 6 and loader.state_dict() == {"epoch": 0, "offset": 0}
    states = []
    for _ in loader:
        states.append(loader.state_dict())
    assert states[0] == {"epoch": 0, "offset": 10}
    assert states[-2] == {"epoch": 0, "offset": 50}
    assert states[-1] == {"epoch": 1, "offset": 0}  # after the short last batch (1 of 51)
    assert loader.epoch == 1
    # resuming exactly at the boundary gives the full next epoch, no empty one
    other = ShardLoader(toy, "train", 10, rank=0, world_size=2, seed=0, drop_last=False)
    other.load_state_dict(states[-1])
    assert _labels(other) == _labels(loader)
    with pytest.raises(ValueError, match=r"state: epoch 0, offset 51"):
        other.load_state_dict({"epoch": 0, "offset": 51})


def test_flips_are_seeded_and_only_mirror(toy):
    def run(flip, seed=0):
        loader = ShardLoader(toy, "train", 16, rank=0, world_size=1, seed=seed, flip=flip)
        return [(x.clone(), y) for x, y in loader]

    plain, flipped, again, other = run(False), run(True), run(True), run(True, seed=1)
    n_flipped = 0
    for (x0, y0), (x1, y1), (x2, _) in zip(plain, flipped, again, strict=True):
        assert torch.equal(y0, y1)  # flips change no order
        assert torch.equal(x1, x2)
        mirrored = (x1 != x0).flatten(1).any(1)
        torch.testing.assert_close(x1[mirrored], x0[mirrored].flip(-1), rtol=0, atol=0)
        n_flipped += int(mirrored.sum())
    assert 25 < n_flipped < 71  # ~half of 96
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(flipped, other, strict=False))


def test_streams_only_the_shards_of_its_block(toy, monkeypatch):
    loader = ShardLoader(toy, "train", 4, rank=2, world_size=3, seed=0, drop_last=False)
    reads = []
    original = loader.dataset.read_shard
    monkeypatch.setattr(
        loader.dataset, "read_shard", lambda split, i: reads.append(i) or original(split, i)
    )
    list(loader)
    assert len(reads) == len(set(reads)) <= 34 // 10 + 2  # 34 examples, shards of 10


def test_bad_arguments_are_named(toy, tmp_path):
    with pytest.raises(ValueError, match="rank/world_size"):
        ShardLoader(toy, "train", 4, rank=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(toy, "train", 4, rank=0, world_size=1, seed=-1)
    with pytest.raises(ValueError, match=r"batch_size/world_size: 103 examples"):
        ShardLoader(toy, "train", 64, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match=r"split: 'test'.*\['train'\]"):
        ShardLoader(toy, "test", 4, rank=0, world_size=1, seed=0)
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        ShardLoader(str(tmp_path / "missing"), "train", 4, rank=0, world_size=1, seed=0)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "ShardLoader-prefetch" and t.is_alive()]


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_yields_the_same_batches_and_states(toy, depth):
    """Across two epoch ends (12 batches per epoch), with flips: equal batches, and the
    state after each batch names the caller's next batch, not the thread's."""
    kwargs = dict(rank=1, world_size=2, seed=7, flip=True, drop_last=False)
    plain = ShardLoader(toy, "train", 4, **kwargs)
    ahead = ShardLoader(toy, "train", 4, prefetch=depth, **kwargs)
    it_plain, it_ahead = plain.batches(), ahead.batches()
    for _ in range(30):
        (x, y), (x_ref, y_ref) = next(it_ahead), next(it_plain)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        assert ahead.state_dict() == plain.state_dict()
    assert _prefetch_threads()
    it_ahead.close()
    assert not _prefetch_threads()  # closing the iterator stops its thread
    assert [y.tolist() for _, y in ahead] == [y.tolist() for _, y in plain]  # one epoch


@pytest.mark.parametrize("stop", [1, 11, 12, 13])
def test_resume_with_prefetch_is_exact(toy, stop):
    kwargs = dict(rank=0, world_size=2, seed=2, flip=True, drop_last=False, prefetch=2)
    reference = _run(ShardLoader(toy, "train", 4, **kwargs), 26)
    first = ShardLoader(toy, "train", 4, **kwargs)
    _run(first, stop)  # its thread has read ahead of `stop` meanwhile
    resumed = ShardLoader(toy, "train", 4, **kwargs)
    resumed.load_state_dict(first.state_dict())
    for (x, y), (x_ref, y_ref) in zip(_run(resumed, 26 - stop), reference[stop:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_prefetch_raises_the_threads_error(tmp_path):
    uri = _make(tmp_path, n=40, shard_size=10)
    loader = ShardLoader(uri, "train", 4, rank=0, world_size=1, seed=0, prefetch=1)
    for shard in (tmp_path / "train").glob("*.parquet"):
        shard.write_bytes(b"not parquet")
    with pytest.raises(Exception, match=r"checksum|sha256|parquet|Parquet"):
        list(loader)
    assert not _prefetch_threads()
    with pytest.raises(ValueError, match=r"prefetch: got -1"):
        ShardLoader(uri, "train", 4, rank=0, world_size=1, seed=0, prefetch=-1)
