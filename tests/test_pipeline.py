"""Training from image files: bucketed deterministic order, prefetching loader, resume, masks."""

import copy
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import TrainedRun, file_config, make_data, write_shards
from jaxcond import checkpoint, config as config_lib, masks as masks_lib, train as train_lib
from jaxcond.data import files, order, pipeline


def test_bucketed_order_one_bucket_per_batch_and_deterministic():
    buckets = tuple(np.random.default_rng(0).integers(0, 3, 100).tolist())
    spe = order.bucketed_steps_per_epoch(8, buckets)
    assert spe == sum(c // 8 for c in np.bincount(buckets))
    seen = []
    for step in range(spe):
        b, ids = order.bucketed_batch(5, step, 8, buckets)
        assert len(ids) == 8 and all(buckets[i] == b for i in ids)
        seen += ids.tolist()
    assert len(seen) == len(set(seen))  # no record twice in an epoch
    again = [order.bucketed_batch(5, s, 8, buckets)[1].tolist() for s in range(spe)]
    assert again == [seen[i * 8:(i + 1) * 8] for i in range(spe)]
    assert order.bucketed_batch(5, spe, 8, buckets)[1].tolist() != seen[:8]  # a new epoch reshuffles


def test_single_bucket_order_is_the_documented_batch_ids():
    for step in (0, 3, 12, 40):
        _, ids = order.bucketed_batch(7, step, 16, (0,) * 200)
        np.testing.assert_array_equal(ids, order.batch_ids(7, step, 16, 200))


def test_folder_data_checks_buckets_and_reports(config, family, image_folder):
    cfg = file_config(config, image_folder)
    data = make_data(cfg, family)
    assert data.num_records == 104
    assert np.bincount(data.buckets).tolist() == [64, 40]
    assert data.report.counts["skipped: no caption"] == 1
    assert data.report.counts["skipped: not a readable image (corrupt, truncated or not an image)"] == 1
    for step in range(3 * data.steps_per_epoch):  # the loader's kept epoch plans = the pure order
        np.testing.assert_array_equal(data.ids(step), order.bucketed_batch(cfg.seed, step, 16, data.buckets)[1])
    for step in range(data.steps_per_epoch):
        b = data.batch(data.ids(step), step)
        assert b["images"].shape[1:3] in ((16, 16), (16, 24)) and b["tokens"].shape[0] == 16


@pytest.mark.parametrize("processes", [0, 2])
def test_prefetcher_yields_exactly_the_direct_batches(config, family, image_folder, processes):
    data = make_data(file_config(config, image_folder), family)
    rows = np.arange(3, 11)
    got_steps = []
    for step, got in pipeline.Prefetcher(data, rows, 2, 9, workers=3, prefetch=2, processes=processes):
        got_steps.append(step)
        want = data.batch(data.ids(step)[rows], step)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert got_steps == list(range(2, 9))


@pytest.fixture(scope="module")
def folder_run(config, image_folder, tmp_path_factory):
    """A run from a copy of the images (one test adds a file to it, and removes it again),
    stopped after step 4 and its checkpoint as an interruption would leave it."""
    root = tmp_path_factory.mktemp("folder_run")
    shutil.copytree(image_folder, root / "images")
    cfg = file_config(config, root / "images")
    out = train_lib.train(cfg, str(root / "run"), progress=False, stop_at=4)
    return cfg, TrainedRun(root / "run", out)


def test_training_from_a_folder_resumes_exactly_and_logs_its_masks(folder_run, tmp_path):
    cfg, interrupted = folder_run
    assert cfg.dropout.groups.caption.rate == 0.3
    ref = train_lib.train(cfg, str(tmp_path / "ref"), progress=False)
    assert [h["step"] for h in interrupted.out["history"]] == [1, 2, 3, 4]
    split = interrupted.copy_to(tmp_path / "split")
    out = train_lib.train(cfg, str(split), progress=False)
    for want, got in zip(ref["history"][4:], out["history"]):
        assert want["loss"] == got["loss"]
    logged = [json.loads(line) for line in open(split / "masks.jsonl")]
    assert logged == list(masks_lib.mask_records(cfg, range(cfg.train.steps)))
    assert (tmp_path / "ref" / "samples_final.png").exists() and ref["scores"] == {}


def test_captions_the_text_encoder_cuts_are_kept_and_counted(config, family, image_folder, tmp_path, caplog):
    """The demo tokenizer holds 12 tokens: start, 10 words, end."""
    ten, eleven = " ".join(["red"] * 10), " ".join(["red"] * 11)
    assert family.overlong([ten, eleven, ""]).tolist() == [False, True, False]
    np.testing.assert_array_equal(family.tokenize([eleven]), family.tokenize([ten]))  # the 11th word is lost
    folder = tmp_path / "long"
    folder.mkdir()
    for name in sorted(os.listdir(image_folder))[:40]:  # 000.png ... 019.txt: one batch of squares
        shutil.copy(image_folder / name, folder / name)
    for name in ("001.txt", "007.txt"):
        (folder / name).write_text((folder / name).read_text() + ", in the style of a children's book")
    cfg = file_config(config, folder)
    with caplog.at_level("INFO", logger="jaxcond"):
        data = make_data(cfg, family)
    what = "caption over the text encoder's 12 tokens: kept, end cut"
    assert data.num_records == 20 and data.report.counts[what] == 2
    assert data.report.examples[what] == [str(folder / "001.png"), str(folder / "007.png")]
    assert f"{what:<66} {2:>7}  001.png, 007.png" in caplog.text  # the report table printed at start
    assert "children" in data.records[1].caption  # kept whole: augmentation may move the cut


def test_overlong_prompts_are_named_when_sampling(family, caplog):
    from jaxcond.sampling import warn_overlong

    with caplog.at_level("WARNING", logger="jaxcond"):
        warn_overlong(family, ["a red circle on a blue background"] * 2, "--prompt")
        assert not caplog.records
        warn_overlong(family, ["a red circle", " ".join(["red"] * 11)], "--prompt")
    assert caplog.records[0].getMessage() == (
        "--prompt: 1 of 2 prompts are longer than the text encoder's 12 tokens; the model sees only their "
        "start (first: 'red red red red red red red red red red red')")


def test_file_source_config_errors(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.data.source = "folder"
    with pytest.raises(config_lib.ConfigError, match="config.data.path"):
        train_lib.train(cfg, str(tmp_path), progress=False)
    cfg.data.path = str(tmp_path / "missing")
    cfg.data.buckets = (32, 32)  # one bucket without its enclosing tuple
    with pytest.raises(config_lib.ConfigError, match=r"config.data.buckets = \(32, 32\): each bucket is \(height, "
                                                     r"width\) .*; one bucket is written \(\(h, w\),\)$"):
        config_lib.validate(cfg, None)
    cfg.data.buckets = ()
    with pytest.raises(files.DataError, match="does not exist"):
        train_lib.train(cfg, str(tmp_path), progress=False)
    (tmp_path / "few").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "few" / "a.png")
    (tmp_path / "few" / "a.txt").write_text("x")
    cfg.data.path = str(tmp_path / "few")
    with pytest.raises(files.DataError, match=r"1 usable images, fewer than one global batch \(16\); see the "
                                              r"table above$"):
        train_lib.train(cfg, str(tmp_path), progress=False)


def test_captions_with_another_extension(config, family, image_folder, tmp_path, caplog):
    folder = tmp_path / "kohya"
    folder.mkdir()
    for i in range(16):
        shutil.copy(image_folder / f"{i:03d}.png", folder)
        shutil.copy(image_folder / f"{i:03d}.txt", folder / f"{i:03d}.caption")
    cfg = copy.deepcopy(config)
    cfg.data.source, cfg.data.path = "folder", str(folder)
    with caplog.at_level("INFO", logger="jaxcond"), pytest.raises(files.DataError) as e:
        make_data(cfg, family)
    assert str(e.value).endswith("see the table above; 16 images have no <name>.txt caption: set "
                                 "config.data.caption_extension to their captions' extension, or "
                                 "config.data.missing_caption=empty")
    assert f"{'skipped: no caption':<66} {16:>7}  000.png, 001.png, 002.png" in caplog.text  # the table above
    cfg.data.caption_extension = ".caption"
    data = make_data(cfg, family)
    assert [r.caption for r in data.records] == [(image_folder / f"{i:03d}.txt").read_text() for i in range(16)]
    cfg.data.caption_extension = "caption"
    with pytest.raises(config_lib.ConfigError, match=r"config.data.caption_extension = 'caption': a file "
                                                     r"extension with its dot, e.g. .txt or .caption"):
        train_lib.build(cfg, str(tmp_path / "run"))


def test_shards_give_the_same_batches_as_the_files(config, family, image_folder, tmp_path):

    cfg = file_config(config, image_folder)
    index = write_shards(cfg, str(tmp_path / "shards"), num_shards=3)
    assert len(index["shards"]) == 3 and len(index["sizes"]) == 104
    from_files = make_data(cfg, family)
    sharded = copy.deepcopy(cfg)
    sharded.data.source, sharded.data.path = "shards", str(tmp_path / "shards")
    from_shards = make_data(sharded, family)
    assert from_shards.buckets == from_files.buckets
    assert from_shards.report.counts == from_files.report.counts  # the checks ran at write time
    for step in (0, 1, from_files.steps_per_epoch + 2):  # random crops, flips: same per record
        ids = from_files.ids(step)
        np.testing.assert_array_equal(ids, from_shards.ids(step))
        a, b = from_files.batch(ids, step), from_shards.batch(ids, step)
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    (tmp_path / "shards" / "index.json").unlink()
    with pytest.raises(files.DataError, match="jaxcond shards"):
        make_data(sharded, family)


def test_cli_shards_writes_and_names_the_training_flags(image_folder, tmp_path):
    from test_config import _cli

    r = _cli("shards", "--config", "configs/demo.py", "--config.data.source=folder",
             f"--config.data.path={image_folder}", f"--shards_out={tmp_path / 's'}", "--num_shards=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "104 records in 2 shards" in r.stdout and "--config.data.source=shards" in r.stdout
    r = _cli("shards", "--config", "configs/demo.py", f"--shards_out={tmp_path / 't'}")
    assert r.returncode != 0 and "not 'demo'" in r.stderr and "Traceback" not in r.stderr
    blocked = tmp_path / "s" / "index.json" / "more"  # under a file
    r = _cli("shards", "--config", "configs/demo.py", "--config.data.source=folder",
             f"--config.data.path={image_folder}", f"--shards_out={blocked}")
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"jaxcond shards: --shards_out '{blocked}' is not writable (Not a directory): choose another path or "
        "fix its permissions/space"]


def test_hf_datasets_source_matches_the_files(config, family, image_folder, tmp_path):
    import datasets

    cfg = file_config(config, image_folder)
    from_files = make_data(cfg, family)
    rows = {"image": [{"bytes": open(r.path, "rb").read(), "path": None} for r in from_files.records],
            "text": [r.caption for r in from_files.records]}
    rows["image"].insert(5, {"bytes": b"not an image", "path": None})  # both are skipped and counted
    rows["text"].insert(5, "x")
    rows["image"].insert(9, rows["image"][0])
    rows["text"].insert(9, None)
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    hf = copy.deepcopy(cfg)
    hf.data.source, hf.data.path = "hf", str(tmp_path / "ds")
    data = make_data(hf, family)
    assert data.num_records == from_files.num_records and data.buckets == from_files.buckets
    assert data.report.counts["skipped: no caption"] == 1
    assert data.report.counts["skipped: not a readable image (corrupt, truncated or not an image)"] == 1
    for step in (0, 5):
        ids = data.ids(step)
        a, b = from_files.batch(ids, step), data.batch(ids, step)
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    hf.data.caption_column = "caption"
    with pytest.raises(files.DataError, match="no column 'caption'"):
        make_data(hf, family)


def test_resume_refuses_changed_data_and_checkpoints_the_loader_state(folder_run, tmp_path):
    cfg, interrupted = folder_run
    run = str(interrupted.copy_to(tmp_path / "run"))
    ckpts = checkpoint.Checkpoints(os.path.join(run, "checkpoints"), every_steps=4, keep=3, async_save=False)
    saved = ckpts.saved_data(4)
    ckpts.close()
    assert saved["next_step"] == 4 and saved["num_records"] == 104
    folder = pathlib.Path(cfg.data.path)
    extra = [folder / "extra.png", folder / "extra.txt"]
    extra[0].write_bytes((folder / "000.png").read_bytes())
    extra[1].write_text("a new image")
    try:
        with pytest.raises(config_lib.ConfigError,
                           match="training data changed: 104 records at the checkpoint, 105 now"):
            train_lib.train(cfg, run, progress=False)
        out = train_lib.train(cfg, run, progress=False, allow_config_change=True, stop_at=5)
        assert [h["step"] for h in out["history"]] == [5]
    finally:  # the folder is the module's run's data again
        for f in extra:
            f.unlink()
