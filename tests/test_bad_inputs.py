"""Bad input that must never stop a run, each counted under its true reason: file-system
oddities, metadata values of the wrong type, several captions per image, and a corpus
mixing good and broken files built the way training builds it."""

import collections
import copy
import errno
import io
import json
import os
import socket
import stat

import numpy as np
import pytest
from PIL import Image

from conftest import file_config, make_data, write_shards
from jaxcond.data import captions, demo as demo_data, files, pipeline

REAL_OPEN = open


def _deny(monkeypatch, errors: dict) -> None:
    """files' open() fails on these basenames with their errno, as it would for a user
    without the permission (tests run as root, who may read anything) or on a failing disk;
    opening a named pipe fails the test."""

    def guarded(path, *args, **kw):
        if os.path.basename(path) in errors:
            error = errors[os.path.basename(path)]
            raise OSError(error, os.strerror(error), path)  # PermissionError for EACCES
        assert not stat.S_ISFIFO(os.stat(path).st_mode), f"opened the named pipe {path}: it would block"
        return REAL_OPEN(path, *args, **kw)

    monkeypatch.setattr(files, "open", guarded, raising=False)


def _image(path, colour=(200, 30, 30), caption: str | None = "a caption", size=(16, 16)) -> None:
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def _socket(path) -> None:
    """A Unix socket at `path` (bound by its short relative name: socket paths are limited)."""
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)
    finally:
        os.chdir(cwd)


def test_file_system_oddities_are_counted_skips(tmp_path, monkeypatch):
    _image(tmp_path / "ok.png")
    _image(tmp_path / "capdir.png")
    (tmp_path / "capdir.txt").unlink()
    (tmp_path / "capdir.txt").mkdir()  # `x.txt/` next to x.png
    _image(tmp_path / "capdenied.png")
    _image(tmp_path / "caplink.png", caption=None)
    os.symlink("gone.txt", tmp_path / "caplink.txt")
    _image(tmp_path / "cappipe.png", caption=None)
    os.mkfifo(tmp_path / "cappipe.txt")
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink("missing.png", tmp_path / "broken.png")
    os.mkfifo(tmp_path / "pipe.png")
    _socket(tmp_path / "sock.png")
    os.symlink("/dev/null", tmp_path / "dev.png")
    _image(tmp_path / "denied.png")
    _image(tmp_path / "eio.png")
    for name in ("loop", "broken", "pipe", "sock", "dev"):
        (tmp_path / f"{name}.txt").write_text("a caption")
    for hidden in (".ipynb_checkpoints", ".git"):
        (tmp_path / hidden).mkdir()
        _image(tmp_path / hidden / "ok.png")
    _image(tmp_path / "._ok.png")  # macOS AppleDouble
    (tmp_path / "elsewhere").mkdir()
    _image(tmp_path / "elsewhere" / "x.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "linked")
    (tmp_path / "locked").mkdir()
    _image(tmp_path / "locked" / "x.png")
    _deny(monkeypatch, {"capdenied.txt": errno.EACCES, "denied.png": errno.EACCES, "eio.png": errno.EIO})
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # os.walk lists folders with it

    report = files.Report()
    records = files.scan_folder(str(tmp_path), report)
    kept = [r.path for r in records if pipeline.decode(r.path, 16, report) is not None]
    assert kept == [str(tmp_path / "ok.png"), str(tmp_path / "elsewhere" / "x.png")]
    assert report.counts == {
        "skipped: caption file: a folder, not a file": 1,
        "skipped: caption file: unreadable (permission denied)": 1,
        "skipped: caption file: broken symlink": 1,
        "skipped: caption file: not a regular file (named pipe)": 1,
        "skipped: symlink loop": 1,
        "skipped: broken symlink": 1,
        "skipped: not a regular file (named pipe)": 1,
        "skipped: not a regular file (socket)": 1,
        "skipped: not a regular file (device)": 1,
        "skipped: unreadable (permission denied)": 1,
        "skipped: unreadable (input/output error)": 1,
        "skipped: hidden folder (not scanned)": 2,
        "skipped: hidden file": 1,
        "skipped: symlink to a folder (not followed)": 1,
        "skipped: folder unreadable (permission denied)": 1,
    }
    assert report.examples["skipped: caption file: a folder, not a file"] == [str(tmp_path / "capdir.txt")]
    assert report.examples["skipped: hidden folder (not scanned)"] == [str(tmp_path / ".git"),
                                                                         str(tmp_path / ".ipynb_checkpoints")]


def test_a_folder_source_given_a_file_says_so(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("")
    _image(tmp_path / "a.png")
    with pytest.raises(files.DataError, match=r"metadata.jsonl' is a file, not a folder; use data.source=metadata"):
        files.scan_folder(str(tmp_path / "metadata.jsonl"), files.Report())
    with pytest.raises(files.DataError, match=r"a.png' is a file, not a folder; set data.path to the folder"):
        files.scan_folder(str(tmp_path / "a.png"), files.Report())
    with pytest.raises(files.DataError, match=r"does not exist"):
        files.scan_folder(str(tmp_path / "nowhere"), files.Report())


def _jsonl(path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metadata_values_of_the_wrong_type_are_counted_by_line(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    for name in ("data/a", "data/b", "data/c", "outside/d", "outside/e"):
        _image(tmp_path / f"{name}.png", caption=None)
    os.mkfifo(tmp_path / "data" / "pipe.png")
    _jsonl(tmp_path / "data" / "metadata.jsonl", [
        {"file_name": "a.png", "text": "ok"},                                # 1
        {"file_name": 7, "text": "x"},                                       # 2
        {"file_name": None, "text": "x"},                                    # 3
        {"file_name": ["a.png"], "text": "x"},                               # 4
        {"file_name": " ", "text": "x"},                                     # 5
        {"file_name": {"path": "a.png"}},                                    # 6
        {"file_name": True},                                                 # 7
        {"text": "no file_name key on this row"},                            # 8
        {"file_name": "b.png", "text": [" one ", "two", ""]},                # 9: two captions
        {"file_name": "c.png", "text": []},                                  # 10: no caption
        {"file_name": "c.png", "text": ["x", 3]},                            # 11
        {"file_name": "c.png", "text": {"en": "x"}},                         # 12
        {"file_name": "c.png", "text": 1984},                                # 13
        {"file_name": "c.png", "text": False},                               # 14
        {"file_name": "../outside/d.png", "text": "out"},                    # 15
        {"file_name": str(tmp_path / "outside" / "e.png"), "text": "abs"},   # 16
        {"file_name": "a.png", "text": "again"},                             # 17
        {"file_name": "./a.png", "text": "and again"},                       # 18
        {"file_name": "sub", "text": "x"},                                   # 19
        {"file_name": "pipe.png", "text": "x"},                              # 20
        {"file_name": "a\0.png", "text": "x"},                               # 21
        {"file_name": "c.png", "text": ["", " "]},                           # 22: only empty ones
        {"file_name": "c.png", "text": ["solo"]},                            # 23
    ])
    report = files.Report()
    records = files.scan_metadata(str(tmp_path / "data"), report)
    caps = [(os.path.basename(r.path), r.caption) for r in records]
    assert caps == [("a.png", "ok"), ("b.png", ("one", "two")), ("d.png", "out"), ("e.png", "abs"),
                    ("a.png", "again"), ("a.png", "and again"), ("c.png", ""), ("c.png", "solo")]
    not_a_path = "skipped: metadata file_name is not a path"
    assert report.counts == {
        f"{not_a_path} (number)": 1, f"{not_a_path} (missing or null)": 2, f"{not_a_path} (list)": 1,
        f"{not_a_path} (empty string)": 1, f"{not_a_path} (object)": 1, f"{not_a_path} (true/false)": 1,
        f"{not_a_path} (NUL character)": 1,
        "kept: several captions (one per epoch)": 1,
        "skipped: no caption": 1,
        "skipped: metadata text is not a string or list of strings": 4,
        "kept: file_name outside the metadata's folder": 2,
        "kept: duplicate row (the file is listed again)": 3,
        "skipped: a folder, not a file": 1,
        "skipped: not a regular file (named pipe)": 1,
        "kept: empty caption (unconditional)": 1,
    }
    tables = report.table()
    assert "metadata.jsonl:2" in tables and "metadata.jsonl:11, metadata.jsonl:12, metadata.jsonl:13" in tables
    assert report.examples["kept: duplicate row (the file is listed again)"] == [
        str(tmp_path / "data" / f"metadata.jsonl:{n}") for n in (17, 18, 23)]


def test_csv_metadata_values_are_all_text(tmp_path):
    for name in ("a", "b"):
        _image(tmp_path / f"{name}.png", caption=None)
    (tmp_path / "metadata.csv").write_text("text,file_name\n1984,a.png\nx,\nshort\nhello, world,b.png\n")
    report = files.Report()
    caps = [r.caption for r in files.scan_metadata(str(tmp_path / "metadata.csv"), report)]
    assert caps == ["1984"]  # a number in a CSV is a caption like any other
    assert report.counts == {"skipped: metadata file_name is not a path (empty string)": 1,
                             "skipped: metadata file_name is not a path (missing or null)": 1,
                             "skipped: listed in the metadata, no such file": 1}  # " world" became the name
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.png,hello, world\n")
    report = files.Report()
    assert [r.caption for r in files.scan_metadata(str(tmp_path / "metadata.csv"), report)] == ["hello"]
    assert report.counts == {"kept: CSV row has extra fields (ignored; quote commas in captions)": 1}
    assert report.examples["kept: CSV row has extra fields (ignored; quote commas in captions)"] == [
        f"{tmp_path / 'metadata.csv'}:2"]


def test_an_unreadable_metadata_file_is_one_line(tmp_path, monkeypatch):
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "x"}])
    _deny(monkeypatch, {"metadata.jsonl": errno.EACCES})
    with pytest.raises(files.DataError, match=r"^metadata file '.*metadata.jsonl': unreadable \(permission denied\)$"):
        files.scan_metadata(str(tmp_path), files.Report())
    os.remove(tmp_path / "metadata.jsonl")
    os.mkfifo(tmp_path / "metadata.jsonl")  # never opened
    with pytest.raises(files.DataError, match=r"metadata.jsonl': not a regular file \(named pipe\)$"):
        files.scan_metadata(str(tmp_path / "metadata.jsonl"), files.Report())


def test_several_captions_one_per_epoch(config, family, tmp_path):
    combos = demo_data.all_combinations()
    rows = []
    for i in range(16):
        Image.fromarray(np.full((32, 32, 3), i * 10, np.uint8)).save(tmp_path / f"{i}.png")
        text = [demo_data.caption(combos[i]), demo_data.caption(combos[i + 20])]
        rows.append({"file_name": f"{i}.png", "text": text if i % 4 else text[0]})
    rows[1]["text"].append(" ".join(["red"] * 11))  # over the demo tokenizer's 12: counted once
    _jsonl(tmp_path / "metadata.jsonl", rows)
    cfg = file_config(config, tmp_path)
    cfg.data.source = "metadata"
    data = make_data(cfg, family)
    assert data.report.counts["kept: several captions (one per epoch)"] == 12
    assert data.report.examples["caption over the text encoder's 12 tokens: kept, end cut"] == [str(tmp_path / "1.png")]
    assert isinstance(data.records[1].caption, tuple) and isinstance(data.records[0].caption, str)
    seen = collections.defaultdict(set)
    for epoch in range(20):
        step = epoch * data.steps_per_epoch
        ids = data.ids(step)
        got = data.batch(ids, step)["tokens"]
        for row, i in enumerate(ids):
            every = captions.as_tuple(data.records[i].caption)
            want = every[np.random.default_rng([cfg.seed, epoch, int(i), 2]).integers(len(every))]  # its own stream
            np.testing.assert_array_equal(got[row], family.tokenize([want])[0])
            seen[int(i)].add(want)
    assert all(len(seen[i]) > 1 for i in range(16) if i % 4)  # an image's captions take turns
    cfg.data.eval_prompts = ()
    assert make_data(cfg, family).eval_captions(2) == [rows[0]["text"], rows[1]["text"][0]]
    sharded = copy.deepcopy(cfg)
    write_shards(cfg, str(tmp_path / "shards"), num_shards=2)
    sharded.data.source, sharded.data.path = "shards", str(tmp_path / "shards")
    from_shards = make_data(sharded, family)
    assert from_shards.read(1)[0].caption == data.records[1].caption  # a tuple again
    step = data.steps_per_epoch + 1
    np.testing.assert_array_equal(from_shards.batch(data.ids(step), step)["tokens"],
                                  data.batch(data.ids(step), step)["tokens"])
    rows[2]["text"] = rows[2]["text"][::-1]  # another order, another dataset
    _jsonl(tmp_path / "metadata.jsonl", rows)
    assert make_data(cfg, family).fingerprint != data.fingerprint


def test_hf_rows_with_caption_lists_numbers_and_no_image(config, family, tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(buf, "PNG")
    combos = demo_data.all_combinations()
    texts = [[demo_data.caption(combos[i]), demo_data.caption(combos[i + 1])] for i in range(17)]
    images = [{"bytes": buf.getvalue(), "path": None}] * 16 + [None]
    texts[3] = []  # no caption
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string")),
                                  "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": images, "text": texts, "label": list(range(17))}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = file_config(config, tmp_path / "ds")
    cfg.data.source, cfg.data.missing_caption = "hf", "empty"
    data = make_data(cfg, family)
    assert data.num_records == 16 and data.records[0].caption == tuple(texts[0]) and data.records[3].caption == ""
    assert data.report.counts["skipped: no image in the row"] == 1
    assert data.report.counts["kept: several captions (one per epoch)"] == 16  # the row without an image too
    cfg.data.caption_column = "label"  # numbers: more likely the wrong column than captions
    with caplog.at_level("INFO", logger="jaxcond"), pytest.raises(files.DataError, match="0 usable images"):
        make_data(cfg, family)
    assert f"{'skipped: dataset caption is not a string or list of strings':<66} {17:>7}" in caplog.text


# ---- a corpus mixing good files with a seeded draw of broken ones, built as training builds it

def _good_images() -> list[tuple[str, bytes, tuple[int, int, int], int]]:
    """20 solid 32x32 images in formats and modes that convert: (name, bytes, colour, tolerance)."""
    out = []
    for i in range(20):
        c = (i * 12, 255 - i * 12, (i * 37) % 256)
        grey = i * 12
        kind = i % 7
        if kind == 0:
            img, fmt, colour = Image.new("RGB", (32, 32), c), "PNG", c
        elif kind == 1:
            img, fmt, colour = Image.new("RGB", (32, 32), c), "JPEG", c
        elif kind == 2:
            img, fmt, colour = Image.new("L", (32, 32), grey), "PNG", (grey,) * 3
        elif kind == 3:
            img, fmt, colour = Image.new("RGB", (32, 32), c).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", c
        elif kind == 4:
            img = Image.fromarray(np.full((32, 32), grey * 257, np.uint16))
            fmt, colour = "PNG", (grey,) * 3
        elif kind == 5:
            img, fmt, colour = Image.fromarray(np.full((32, 32), grey / 255, np.float32)), "TIFF", (grey,) * 3
        else:
            img, fmt, colour = Image.new("RGBA", (32, 32), (*c, 255)), "PNG", c
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append((f"good{i:02d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}", buf.getvalue(), colour,
                    3 if fmt == "JPEG" else 1))
    return out


def _bad_kinds():
    """(maker, reason): maker(p, denied) makes one broken input at the path `p` (a stem, no
    extension) and adds to `denied` the names open() must refuse."""
    from test_files import _png_with_header_size

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "PNG")
    truncated = buf.getvalue()[:60]

    def img(p, caption=True, **kw):  # a good image, its caption optional
        _image(p.with_suffix(".png"), caption="a red circle" if caption else None, **kw)

    def captioned(make):  # the image file is the broken part: its caption is fine
        return lambda p, denied: (make(p), p.with_suffix(".txt").write_text("a red circle"))

    def nan(p):
        Image.fromarray(np.full((32, 32), np.nan, np.float32)).save(p.with_suffix(".tif"))

    return [
        (captioned(lambda p: p.with_suffix(".png").write_bytes(b"")), "skipped: zero-byte file"),
        (captioned(lambda p: p.with_suffix(".jpg").write_text("not a jpeg")),
         "skipped: not a readable image (corrupt, truncated or not an image)"),
        (captioned(lambda p: p.with_suffix(".png").write_bytes(truncated)),
         "skipped: not a readable image (corrupt, truncated or not an image)"),
        (captioned(lambda p: os.symlink(f"{p.name}.png", p.with_suffix(".png"))), "skipped: symlink loop"),
        (captioned(lambda p: os.symlink("nowhere.png", p.with_suffix(".png"))), "skipped: broken symlink"),
        (captioned(lambda p: os.mkfifo(p.with_suffix(".png"))), "skipped: not a regular file (named pipe)"),
        (captioned(lambda p: _socket(p.with_suffix(".png"))), "skipped: not a regular file (socket)"),
        (captioned(lambda p: os.symlink("/dev/null", p.with_suffix(".png"))), "skipped: not a regular file (device)"),
        (captioned(nan), "skipped: non-finite pixel values (NaN or infinity)"),
        (captioned(lambda p: p.with_suffix(".png").write_bytes(_png_with_header_size(100_000, 100_000))),
         "skipped: over 64000000 pixels"),
        (lambda p, denied: img(p, size=(3000, 3)), "skipped: aspect ratio over 8x off that of 16x24"),
        (lambda p, denied: (img(p), denied.add(f"{p.name}.png")), "skipped: unreadable (permission denied)"),
        (lambda p, denied: img(p, caption=False), "skipped: no caption"),
        (lambda p, denied: (img(p, caption=False), p.with_suffix(".txt").mkdir()),
         "skipped: caption file: a folder, not a file"),
        (lambda p, denied: (img(p), denied.add(f"{p.name}.txt")),
         "skipped: caption file: unreadable (permission denied)"),
        (lambda p, denied: (img(p, caption=False), os.symlink("gone.txt", p.with_suffix(".txt"))),
         "skipped: caption file: broken symlink"),
        (lambda p, denied: (img(p, caption=False), os.mkfifo(p.with_suffix(".txt"))),
         "skipped: caption file: not a regular file (named pipe)"),
        (lambda p, denied: (os.mkdir(p.parent / f".{p.name}"), img(p.parent / f".{p.name}" / "x")),
         "skipped: hidden folder (not scanned)"),
        (lambda p, denied: img(p.parent / f"._{p.name}"), "skipped: hidden file"),
        (lambda p, denied: os.symlink(p.parent.parent, p), "skipped: symlink to a folder (not followed)"),  # a loop
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_mixed_corpus_trains_every_good_file_and_counts_every_bad_one(config, family, tmp_path, monkeypatch, seed):
    root = tmp_path / "images"
    root.mkdir()
    combos = demo_data.all_combinations()
    good = {}
    for i, (name, data, colour, atol) in enumerate(_good_images()):
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(demo_data.caption(combos[i]))
        good[str(root / name)] = (colour, atol, demo_data.caption(combos[i]))
    kinds, denied = _bad_kinds(), set()
    # Every kind in one of the three corpora (a third of a fixed shuffle each), plus a seeded
    # random draw of more, repeats included.
    draw = np.concatenate([np.random.default_rng(0).permutation(len(kinds))[seed::3],
                           np.random.default_rng(seed).integers(0, len(kinds), 8)])
    for n, k in enumerate(draw):
        kinds[k][0](root / f"bad{n:02d}", denied)
    _deny(monkeypatch, dict.fromkeys(denied, errno.EACCES))

    data = make_data(file_config(config, root), family)  # training would start

    assert sorted(r.path for r in data.records) == sorted(good)  # each good file once, no bad one
    assert all(r.caption == good[r.path][2] for r in data.records)
    ids = np.arange(data.num_records)
    batch = data.batch(ids, 0)
    for i, pixels in zip(ids, batch["images"]):
        colour, atol, _ = good[data.records[i].path]
        np.testing.assert_allclose(pixels.reshape(-1, 3) - np.asarray(colour), 0, atol=atol,
                                   err_msg=data.records[i].path)
    np.testing.assert_array_equal(batch["tokens"], family.tokenize([good[data.records[i].path][2] for i in ids]))
    skipped = {what: n for what, n in data.report.counts.items() if what.startswith("skipped")}
    assert skipped == collections.Counter(kinds[k][1] for k in draw)
