"""Training data on Cloud Storage (the emulator of the `gcs` fixture): a metadata file and
its images, ArrayRecord shards and a cache on gs:// give the same batches as the same
files on a local disk; missing objects are counted skips, a missing bucket one line."""

import copy
import json
import shutil

import numpy as np
import pytest

from conftest import build_cache, file_config, make_data, write_shards
from jaxcond import storage, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.data import cache, files, pipeline, shards

SQUARE, WIDE = range(0, 32), range(64, 80)  # of the image_folder fixture: a full batch per bucket
MISSING = "skipped: listed in the metadata, no such file"
BROKEN = "skipped: not a readable image (corrupt, truncated or not an image)"


@pytest.fixture(autouse=True)
def _few_concurrent_reads(monkeypatch):
    """The emulator serves one request at a time and queues only a few connections: more
    concurrent range reads (a cache's rows) stall in TCP retries. Cloud Storage serves many."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "nofiles_gather_batch_size", 4)


@pytest.fixture(scope="module")
def local(image_folder, tmp_path_factory):
    """48 images with a metadata.jsonl naming them, a missing file and a corrupt one."""
    root = tmp_path_factory.mktemp("metadata")
    rows = []
    for i in [*SQUARE, *WIDE]:
        shutil.copy(image_folder / f"{i:03d}.png", root)
        rows.append({"file_name": f"{i:03d}.png", "text": (image_folder / f"{i:03d}.txt").read_text()})
    shutil.copy(image_folder / "broken.png", root)
    rows.insert(3, {"file_name": "gone.png", "text": "x"})
    rows.insert(7, {"file_name": "broken.png", "text": "x"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def remote(local, gcs):
    """`local` uploaded to gs://: the URL of its folder."""
    url = gcs.url("data", "metadata")
    storage.upload(str(local), url)
    return url


def _config(config, path, source="metadata"):
    cfg = file_config(config, path)  # random crops and flips: same per record anywhere
    cfg.data.source = source
    return cfg


def _same_batches(a, b, steps=None):
    assert a.num_records == b.num_records and a.buckets == b.buckets
    for step in steps or (0, 1, a.steps_per_epoch + 1):
        ids = a.ids(step)
        np.testing.assert_array_equal(ids, b.ids(step))
        want, got = a.batch(ids, step), b.batch(ids, step)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_metadata_on_gs_gives_the_same_batches_as_local(config, family, local, remote):
    from_disk = make_data(_config(config, local), family)
    from_gs = make_data(_config(config, remote), family)  # the folder: its metadata.jsonl is found
    assert from_gs.report.counts == from_disk.report.counts
    assert from_gs.records[0].path == f"{remote}/000.png"
    _same_batches(from_disk, from_gs)



@pytest.mark.parametrize("processes", [0, 2])
def test_prefetched_gs_batches_equal_local(config, family, local, remote, processes):
    """One host's rows, loaded ahead by threads or worker processes as training does."""
    from_disk, from_gs = make_data(_config(config, local), family), make_data(_config(config, remote), family)
    rows = np.arange(4, 12)
    got = list(pipeline.Prefetcher(from_gs, rows, 0, 3, workers=2, prefetch=2, processes=processes))
    for step, batch in got:
        np.testing.assert_array_equal(batch["images"], from_disk.batch(from_disk.ids(step)[rows], step)["images"])
    assert [s for s, _ in got] == [0, 1, 2]


def test_a_missing_gs_image_is_a_counted_skip(config, family, remote):
    data = make_data(_config(config, f"{remote}/metadata.jsonl"), family)
    assert data.num_records == 48
    assert data.report.counts[MISSING] == 1 and data.report.examples[MISSING] == [f"{remote}/gone.png"]
    assert data.report.counts[BROKEN] == 1 and data.report.examples[BROKEN] == [f"{remote}/broken.png"]


def test_metadata_naming_images_by_gs_urls(config, family, local, remote, gcs, tmp_path):
    """A local metadata file naming gs:// URLs, and one on gs:// naming `../` paths, both
    of images in another folder."""
    rows = [json.loads(line) for line in (local / "metadata.jsonl").read_text().splitlines()]
    urls = [{**r, "file_name": f"{remote}/{r['file_name']}"} for r in rows]
    urls.append({"file_name": "s3://bucket/a.png", "text": "x"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in urls))
    from_disk = make_data(_config(config, local), family)
    data = make_data(_config(config, tmp_path / "metadata.jsonl"), family)
    assert data.report.counts[MISSING] == 1 and data.report.examples[MISSING] == [f"{remote}/gone.png"]
    assert data.report.counts["skipped: metadata file_name is not a path (a URL other than gs://)"] == 1
    assert data.report.counts["kept: file_name outside the metadata's folder"] == 49  # broken.png too
    _same_batches(from_disk, data, steps=(0, 2))
    relative = [{**r, "file_name": f"../metadata/./{r['file_name']}"} for r in rows]
    other = gcs.url("data", "other", "metadata.jsonl")
    with storage.local_copy(other) as tmp, open(tmp, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in relative))
    data = make_data(_config(config, other), family)
    assert data.records[0].path == f"{remote}/000.png" and data.report.counts[MISSING] == 1
    _same_batches(from_disk, data, steps=(1,))


def test_missing_bucket_or_folder_is_a_one_line_error(config, family, remote, gcs):
    for url in ("gs://no-such-bucket/data", gcs.url("data", "nothing-here")):
        with pytest.raises(files.DataError) as e:
            make_data(_config(config, url), family)
        assert str(e.value) == f"config.data.path = {url!r} does not exist (no object or folder there: are the " \
                               "bucket and path right?)"
    with pytest.raises(files.DataError, match=r"^'gs://jaxcond-test/data' is a folder with neither metadata.jsonl"):
        make_data(_config(config, gcs.url("data")), family)
    with pytest.raises(ConfigError, match=r"data.source = 'folder' reads local \(or mounted\) files; on Cloud "
                                          r"Storage use data.source=metadata"):
        make_data(_config(config, remote, source="folder"), family)
    with pytest.raises(files.DataError, match=r"has no index.json; write shards"):
        make_data(_config(config, remote, source="shards"), family)


def test_shards_on_gs_give_the_same_batches_as_local(config, family, local, remote, gcs):
    out = gcs.url("data", "shards")
    index = write_shards(_config(config, remote), out, num_shards=2)  # images read from gs, shards written there
    assert storage.listdir(out) == sorted([shards.INDEX, *index["shards"]])
    assert index["report"][MISSING] == 1 and len(index["sizes"]) == 48
    from_gs = make_data(_config(config, out, source="shards"), family)
    assert from_gs.source_digest == shards.index_digest(out)
    _same_batches(make_data(_config(config, local), family), from_gs)


def test_cache_on_gs_gives_the_same_batches_as_local(config, family, local, gcs, tmp_path):
    on_disk = _config(config, local)
    on_disk.data.crop, on_disk.data.flip = "center", False  # what a cache can hold
    on_disk.data.cache = str(tmp_path / "cache")
    build_cache(on_disk, family, on_disk.data.cache)
    images = gcs.url("data", "cached")  # a copy of its own: one image is rewritten below
    storage.upload(str(local), images)
    on_gs = copy.deepcopy(on_disk)
    on_gs.data.path, on_gs.data.cache = images, gcs.url("data", "cache")
    m = build_cache(on_gs, family, on_gs.data.cache)  # images read from gs, the cache written there
    assert m["records"][0][1] == f"{images}/000.png" and storage.exists(f"{on_gs.data.cache}/manifest.json")
    a, b = make_data(on_disk, family), make_data(on_gs, family)
    assert isinstance(b, cache.CachedData) and b.remote
    _same_batches(a, b)
    assert build_cache(on_gs, family, on_gs.data.cache)["done"] == [0]  # complete: nothing rewritten
    losses = [[h["loss"] for h in train_lib.train(cfg, str(tmp_path / name), progress=False, stop_at=2)["history"]]
              for name, cfg in (("disk", on_disk), ("gs", on_gs))]  # the loader's threads read the cache
    assert losses[0] == losses[1] and len(losses[0]) == 2
    with pytest.raises(storage.StorageError, match=r"^gs://jaxcond-test/data/cache/none.npy: not found"):
        storage.read_ranges([f"{on_gs.data.cache}/none.npy"], [0], [1])
    storage.upload(str(local / "001.png"), f"{images}/000.png")  # an image rewritten after caching
    with pytest.raises(ConfigError, match=rf"1 cached images changed on disk since the cache was built "
                                          rf"\(e.g. {images}/000.png\)"):
        make_data(on_gs, family)
    on_disk.data.cache = gcs.url("data", "cache2")  # local images, their cache on gs: a file of it lost
    build_cache(on_disk, family, on_disk.data.cache)
    storage.remove(f"{on_disk.data.cache}/time_ids-c00000-b1.npy")
    with pytest.raises(ConfigError, match=r"cache2: time_ids-c00000-b1.npy is missing; rebuild it"):
        make_data(on_disk, family)


def test_cli_shards_to_gs_and_refusals(remote, gcs):
    from test_config import _cli

    out = gcs.url("cli", "shards")
    r = _cli("shards", "--config", "configs/demo.py", "--config.data.source=metadata",
             f"--config.data.path={remote}", f"--shards_out={out}", "--num_shards=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"48 records in 2 shards in {out}; train with --config.data.source=shards" in r.stdout
    assert shards.INDEX in storage.listdir(out)
    r = _cli("shards", "--config", "configs/demo.py", "--config.data.source=metadata",
             "--config.data.path=gs://no-such-bucket/data", f"--shards_out={gcs.url('cli', 'none')}")
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "jaxcond shards: config.data.path = 'gs://no-such-bucket/data' does not exist (no object or folder "
        "there: are the bucket and path right?)"]
