"""The dataset index (layout.FeatureStore.index, shard_index) and h5 handles across DataLoader forks.

The index must give exactly what walking the shards with h5py's high-level API gives, come from the
cache beside the data when that is current, and be rebuilt (never trusted) when the cache is stale,
corrupt or carries anything but plain arrays. Handles: SignDataset leaves nothing open, make_loader
closes the parent's handles before workers fork, each worker opens its own and reads the same arrays.
"""
import logging
import os
import zipfile

import h5py
import numpy as np
import pytest

from data import DataOptions, SignDataset, make_loader
from signllava.layout import DataError, FeatureStore
from signllava.prompts import PromptBuilder, special_ids
from signllava.shard_index import cache_path
from tests.kit import write_tiny_dataset


@pytest.fixture(scope="module")
def builder(tok):
    ids = special_ids(tok)
    return PromptBuilder(tok, ids["markers"], ids["pad"])


def open_h5_files() -> int:
    """HDF5 files open in this process (other tests may have left some: compare with a count taken before)."""
    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)


def dataset(data, builder, split="train", cls=SignDataset):
    return cls(data, split, builder, DataOptions(), train=split == "train")


def reference_frames(data, split, modality):
    """(video, clip) -> frames, the plain way: every clip of every shard through h5py's high-level API."""
    out = {}
    for path in sorted((data / modality).glob(f"{modality}.{split}.*.h5")):
        with h5py.File(path, "r") as h:
            for video, g in h.items():
                for clip, ds in g.items():
                    out[(video, clip)] = ds.shape[0]
    return out


def test_index_matches_plain_walk_and_leaves_nothing_open(tmp_path, builder):
    data = write_tiny_dataset(tmp_path / "d")
    before = open_h5_files()
    ds = dataset(data, builder)
    ref = {m: reference_frames(data, "train", m) for m in ds.modalities}
    annotated = [(v, c) for v, order in ds.annotation.videos.items() for c in order]
    expected = [(v, c) for v, c in annotated if all((v, c) in ref[m] for m in ds.modalities)]
    assert [(v, c) for v, c, _ in ds.items] == expected and len(expected) == len(annotated) - 2   # two lack pose
    assert all(ds.annotation.videos[v][pos] == c for v, c, pos in ds.items)
    assert ds.frames.dtype == np.int32 and ds.frames.tolist() == [[ref[m][(v, c)] for m in ds.modalities] for v, c, _ in ds.items]
    assert open_h5_files() == before
    assert all(cache_path(s.metadata).is_file() for s in ds.stores.values())


def test_parallel_walk_gives_the_same_index_and_names_a_missing_video(tmp_path, builder, monkeypatch):
    """A large split's first start walks its shards in worker processes: the same index as in-process, and a
    worker's DataError reaches the caller with the file and the video."""
    import concurrent.futures
    from signllava import layout
    data = write_tiny_dataset(tmp_path / "d")
    in_process = dataset(data, builder)
    pools = []

    class Spy(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *a, **k):
            pools.append(a[0] if a else k.get("max_workers"))
            super().__init__(*a, **k)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Spy)
    monkeypatch.setattr(layout, "PARALLEL_WALK_MIN_VIDEOS", 0)
    monkeypatch.setattr(layout.os, "sched_getaffinity", lambda pid: {0, 1})       # two cores, as on CI
    for m in in_process.modalities:
        cache_path(in_process.stores[m].metadata).unlink()
    pooled = dataset(data, builder)
    assert pools == [2] * len(in_process.modalities)                                # 3 shards, 2 workers each
    assert pooled.items == in_process.items and np.array_equal(pooled.frames, in_process.frames)
    cache_path(pooled.stores["mae"].metadata).unlink()
    with h5py.File(data / "mae" / "mae.train.1.h5", "a") as h:
        del h["trainvid1"]
    with pytest.raises(DataError, match=r"mae\.train\.1\.h5.*trainvid1.*not in it"):
        dataset(data, builder)


def test_cache_is_used_and_rebuilt_when_stale_or_corrupt(tmp_path, builder, monkeypatch, caplog):
    data = write_tiny_dataset(tmp_path / "d")
    first = dataset(data, builder)
    walks = []
    real_walk = FeatureStore._walk
    monkeypatch.setattr(FeatureStore, "_walk", lambda self: walks.append(self.modality) or real_walk(self))

    def same(ds):
        return ds.items == first.items and np.array_equal(ds.frames, first.frames)

    assert same(dataset(data, builder)) and walks == []                      # current caches: no shard opened
    shard = data / "pose" / "pose.train.0.h5"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))          # same size, newer: stale
    assert same(dataset(data, builder)) and walks == ["pose"]
    walks.clear()
    caplog.set_level(logging.WARNING, logger="signllava")
    cache_path(data / "mae" / "metadata_mae.train.json").write_bytes(b"PK\x03\x04 not a zip")
    assert same(dataset(data, builder)) and walks == ["mae"]
    assert "unreadable index cache" in caplog.text
    assert same(dataset(data, builder)) and walks == ["mae"]                  # the rebuilt cache is used again


class Payload:
    """Unpickling this would create a file: the proof that loading ran code."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cache_holding_a_pickle_is_refused_and_runs_nothing(tmp_path, builder, caplog):
    data = write_tiny_dataset(tmp_path / "d")
    first = dataset(data, builder)
    marker = tmp_path / "payload_ran"
    cache = cache_path(data / "dino" / "metadata_dino.train.json")
    with np.load(cache, allow_pickle=False) as z:
        arrays = dict(z)
    arrays["keys"] = np.array([Payload(str(marker))] * len(arrays["keys"]), dtype=object)
    with zipfile.ZipFile(cache, "w") as zf:       # what np.savez would write, with the pickled object array
        for k, a in arrays.items():
            with zf.open(f"{k}.npy", "w") as f:
                np.lib.format.write_array(f, a, allow_pickle=True)
    caplog.set_level(logging.WARNING, logger="signllava")
    again = dataset(data, builder)
    assert not marker.exists()
    assert "unreadable index cache" in caplog.text
    assert again.items == first.items and np.array_equal(again.frames, first.frames)
    np.load(cache_path(data / "dino" / "metadata_dino.train.json"), allow_pickle=True)   # a fresh valid cache now
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as zf:
        with zf.open("keys.npy", "w") as f:
            np.lib.format.write_array(f, arrays["keys"], allow_pickle=True)
    np.load(tmp_path / "evil.npz", allow_pickle=True)["keys"]
    assert marker.exists()                        # the payload was live: loading with pickles allowed runs it


def test_unwritable_folder_goes_without_cache(tmp_path, builder, monkeypatch):
    data = write_tiny_dataset(tmp_path / "d")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("signllava.atomic.tempfile.mkstemp", refuse)
    ds = dataset(data, builder)
    assert len(ds) == 4 * 11 - 2
    assert not any(cache_path(s.metadata).exists() for s in ds.stores.values())
    assert not [p for p in data.rglob("*.tmp")]


def test_missing_video_still_named(tmp_path, builder):
    data = write_tiny_dataset(tmp_path / "d")
    with h5py.File(data / "dino" / "dino.train.1.h5", "a") as h:
        del h["trainvid1"]
    with pytest.raises(DataError, match=r"dino\.train\.1\.h5, video 'trainvid1': video placed in this shard by "
                                        r"metadata_dino\.train\.json but not in it"):
        dataset(data, builder)


class Probe(SignDataset):
    """Reports, at its first item in each process, how many HDF5 files that process had open on arrival."""
    def __getitem__(self, key):
        inherited = None
        if getattr(self, "_probe_pid", None) != os.getpid():
            self._probe_pid = os.getpid()
            inherited = (open_h5_files(),
                         sum(s.open_handles() for s in self.stores.values()))
        return {**super().__getitem__(key), "pid": os.getpid(), "inherited": inherited}


def test_workers_open_their_own_handles_and_read_gzip_shards_exactly(tmp_path, builder):
    data = write_tiny_dataset(tmp_path / "d", compression="gzip")
    before = open_h5_files()
    ds = dataset(data, builder, cls=Probe)
    parent = [ds.read_features(v, c) for v, c, _ in ds.items]            # the parent now holds open handles
    assert open_h5_files() == before + 3 * 3                                # 3 shards x 3 modalities
    batches = [list(range(i, min(i + 3, len(ds)))) for i in range(0, len(ds), 3)]
    got = [it for batch in make_loader(ds, batches, lambda items: items, num_workers=4, pin_memory=False) for it in batch]
    pids = {it["pid"] for it in got}
    assert len(pids) == 4 and os.getpid() not in pids
    firsts = [it["inherited"] for it in got if it["inherited"] is not None]
    assert len(firsts) == 4 and all(f == (before, 0) for f in firsts), firsts
    assert [(it["video"], it["clip"]) for it in got] == [(v, c) for v, c, _ in ds.items]
    for it, want in zip(got, parent):
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(it["features"], want))
