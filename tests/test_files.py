"""Bad input on a generated corpus: every file gets its documented treatment, counted."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxcond.data import files

SIZE = 16


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (decoding would be huge)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One file per case; returns the folder and the expected treatment per file."""
    root = tmp_path_factory.mktemp("corpus")
    rgb = Image.fromarray(np.full((40, 64, 3), (200, 30, 30), np.uint8))

    def save(name, img, caption="a caption", **kw):
        img.save(root / name, **kw)
        if caption is not None:
            (root / (name.rsplit(".", 1)[0] + ".txt")).write_bytes(
                caption if isinstance(caption, bytes) else caption.encode())

    save("ok.png", rgb)
    save("cmyk.jpg", rgb.convert("CMYK"))
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent blue
    save("rgba.png", rgba)
    save("palette.png", rgb.convert("P"))
    save("gray.png", rgb.convert("L"))
    save("gray16.png", Image.fromarray(np.full((32, 32), 65535, np.uint16)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save("exif.jpg", Image.fromarray(np.zeros((20, 40, 3), np.uint8)), exif=exif)
    save("small.png", Image.new("RGB", (8, 8), (0, 255, 0)))
    save("banner.png", Image.new("RGB", (3000, 3), (0, 0, 255)))  # cover-resized: 16000 x 16 for a sliver
    save("nocaption.png", rgb, caption=None)
    save("empty.png", rgb, caption="  \n")
    save("latin1.png", rgb, caption="caf\xe9 au lait".encode("cp1252"))
    save("utf16.png", rgb, caption="naïve".encode("utf-16"))
    (root / "zero.png").write_bytes(b"")
    (root / "zero.txt").write_text("x")
    (root / "notimage.jpg").write_text("this is not a jpeg")
    (root / "notimage.txt").write_text("x")
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "truncated.txt").write_text("x")
    (root / "huge.png").write_bytes(_png_with_header_size(100_000, 100_000))
    (root / "huge.txt").write_text("x")
    (root / "readme.md").write_text("not an image, ignored")
    return root


def _decode_all(root, **kw):
    report = files.Report()
    records = files.scan_folder(str(root), report, **kw)
    decoded = {r.path.rsplit("/", 1)[1]: files.decode(r.path, SIZE, report) for r in records}
    return records, decoded, report


def test_every_bad_input_gets_its_treatment(corpus):
    records, decoded, report = _decode_all(corpus)
    kept = {k for k, v in decoded.items() if v is not None}
    assert kept == {"ok.png", "cmyk.jpg", "rgba.png", "palette.png", "gray.png", "gray16.png",
                    "exif.jpg", "small.png", "empty.png", "latin1.png", "utf16.png"}
    c = report.counts
    assert c["skipped: no caption"] == 1
    assert c["skipped: zero-byte file"] == 1
    assert c["skipped: not a readable image (corrupt, truncated or not an image)"] == 2
    assert c["skipped: over 64000000 pixels"] == 1
    assert report.examples[f"skipped: aspect ratio over 8x off that of {SIZE}x{SIZE}"] == [str(corpus / "banner.png")]
    assert c["caption decoded as cp1252 (not UTF-8)"] == 1
    assert c["caption decoded as UTF-16"] == 1
    assert c["converted: CMYK to RGB"] == 1 and c["converted: P to RGB"] == 1
    assert c["converted: L to RGB"] == 1 and c["converted: I;16 (16/32-bit) to 8-bit RGB"] == 1
    assert c["composited on white: transparency"] == 1
    assert c["rotated upright (EXIF orientation)"] == 1
    assert c[f"upscaled: smaller than {SIZE}x{SIZE}"] == 1
    assert c["kept: empty caption (unconditional)"] == 1
    for d in decoded.values():
        if d is not None:
            assert d.pixels.shape == (SIZE, SIZE, 3) and d.pixels.dtype == np.uint8
    table = report.table()
    assert "skipped: zero-byte file" in table and "zero.png" in table


def test_a_list_of_buckets_decodes_into_the_nearest(corpus):
    report = files.Report()
    wide = files.decode(str(corpus / "banner.png"), [(16, 16), (16, 15000), (16, 24)], report)
    assert wide.pixels.shape == (16, 15000, 3)  # kept: it has a bucket of its shape
    assert report.counts == {"upscaled: smaller than 16x15000": 1}  # (3 pixels tall)
    ok = files.decode(str(corpus / "ok.png"), [(16, 16), (16, 15000), (16, 24)], report)
    assert ok.pixels.shape == (16, 24, 3) and ok.original_size == (40, 64)


def test_conversions_give_the_right_pixels(corpus):
    _, decoded, _ = _decode_all(corpus)
    assert (decoded["rgba.png"].pixels == 255).all()  # transparent -> white, not black or blue
    assert (decoded["gray16.png"].pixels == 255).all()  # 16-bit white stays white
    assert decoded["exif.jpg"].original_size == (40, 20)  # 40x20 landscape stored, portrait shown
    np.testing.assert_allclose(decoded["ok.png"].pixels[0, 0], (200, 30, 30), atol=2)
    assert decoded["ok.png"].crop_top_left == (0, (round(64 * SIZE / 40) - SIZE) // 2)


def test_captions_are_decoded_not_lost(corpus):
    report = files.Report()
    caps = {r.path.rsplit("/", 1)[1]: r.caption for r in files.scan_folder(str(corpus), report)}
    assert caps["latin1.png"] == "café au lait" and caps["utf16.png"] == "naïve"
    assert caps["empty.png"] == ""


def test_policies_skip_or_keep(corpus):
    records, decoded, report = _decode_all(corpus, missing_caption="empty", empty_caption="skip")
    names = {r.path.rsplit("/", 1)[1]: r.caption for r in records}
    assert names["nocaption.png"] == "" and "empty.png" not in names
    report = files.Report()
    small = files.decode(str(corpus / "small.png"), SIZE, report, too_small="skip")
    assert small is None and report.counts[f"skipped: smaller than {SIZE}x{SIZE}"] == 1


def test_random_crop_is_deterministic_from_the_rng(corpus):
    path = str(corpus / "ok.png")
    a = files.decode(path, SIZE, files.Report(), crop="random", rng=np.random.default_rng(3))
    b = files.decode(path, SIZE, files.Report(), crop="random", rng=np.random.default_rng(3))
    assert a.crop_top_left == b.crop_top_left and (a.pixels == b.pixels).all()


def test_kohya_repeat_folders(tmp_path):
    for sub, n in (("3_cats", 2), ("dogs", 1)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            Image.new("RGB", (16, 16)).save(tmp_path / sub / f"{i}.png")
            (tmp_path / sub / f"{i}.txt").write_text(f"{sub} {i}")
    records = files.scan_folder(str(tmp_path), files.Report())
    assert [r.caption for r in records] == ["3_cats 0"] * 3 + ["3_cats 1"] * 3 + ["dogs 0"]
    assert [r.id for r in records] == list(range(7))


def test_metadata_jsonl_and_csv(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n"
                                             + json.dumps({"file_name": "b.png"}) + "\n")
    report = files.Report()
    assert [r.caption for r in files.scan_metadata(str(tmp_path / "metadata.jsonl"), report)] == ["x"]
    assert report.counts["skipped: no caption"] == 1
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,hello\n")
    assert files.scan_metadata(str(tmp_path / "metadata.csv"), files.Report())[0].caption == "hello"
    with pytest.raises(files.DataError, match=r"is a folder with both metadata.jsonl and metadata.csv; pass the "):
        files.scan_metadata(str(tmp_path), files.Report())  # which one is meant?
    os.remove(tmp_path / "metadata.jsonl")
    assert files.scan_metadata(str(tmp_path), files.Report())[0].path == str(tmp_path / "a.png")  # imagefolder
    (tmp_path / "sub").mkdir()
    with pytest.raises(files.DataError, match=r"is a folder with neither metadata.jsonl nor metadata.csv"):
        files.scan_metadata(str(tmp_path / "sub"), files.Report())
    (tmp_path / "bad.jsonl").write_text('{"text": "no file"}\n')
    with pytest.raises(files.DataError, match="no 'file_name'"):
        files.scan_metadata(str(tmp_path / "bad.jsonl"), files.Report())
    (tmp_path / "broken.jsonl").write_text('{"file_name": \n')
    with pytest.raises(files.DataError, match=r"broken.jsonl:1: not valid JSON"):
        files.scan_metadata(str(tmp_path / "broken.jsonl"), files.Report())


def test_metadata_from_spreadsheets_and_stale_lists(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    # Excel and Notepad start UTF-8 files with a byte-order mark.
    (tmp_path / "bom.csv").write_bytes("\ufefffile_name,text\r\na.png,\"caf\xe9, two\nlines\"\r\n".encode())
    assert [r.caption for r in files.scan_metadata(str(tmp_path / "bom.csv"), files.Report())] == ["caf\xe9, two\nlines"]
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"file_name": "a.png", "text": "x"}\r\n'.encode())
    assert [r.caption for r in files.scan_metadata(str(tmp_path / "bom.jsonl"), files.Report())] == ["x"]
    # A row whose file was deleted or renamed is skipped and counted, not a crash at start.
    (tmp_path / "stale.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n"
                                          + json.dumps({"file_name": "a.png", "text": "y"}) + "\n")
    report = files.Report()
    assert [r.caption for r in files.scan_metadata(str(tmp_path / "stale.jsonl"), report)] == ["y"]
    assert report.examples == {"skipped: listed in the metadata, no such file": [str(tmp_path / "gone.png")]}
    (tmp_path / "latin.csv").write_bytes("file_name,text\na.png,ok\na.png,caf\xe9\n".encode("cp1252"))
    with pytest.raises(files.DataError, match=r"^.*latin.csv:3: not UTF-8 \(byte 0xe9\); save the file as UTF-8"):
        files.scan_metadata(str(tmp_path / "latin.csv"), files.Report())
    (tmp_path / "list.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n["a.png", "x"]\n')
    with pytest.raises(files.DataError, match=r"list.jsonl:2: a JSON list, not an object"):
        files.scan_metadata(str(tmp_path / "list.jsonl"), files.Report())


def test_caption_augmentation_is_deterministic_and_keeps_leading_tags():
    from jaxcond.data.captions import augment

    cap = "sks person, red hat, smiling, outdoors, sunset, portrait"
    kw = dict(seed=1, epoch=2, record_id=7, shuffle=True, keep_tokens=1, tag_dropout=0.3)
    a, b = augment(cap, **kw), augment(cap, **kw)
    assert a == b and a.startswith("sks person, ")
    assert set(a.split(", ")) <= set(cap.split(", "))
    outs = {augment(cap, **{**kw, "epoch": e}) for e in range(20)}
    assert len(outs) > 5  # a different epoch, a different caption
    assert augment(cap, seed=1, epoch=0, record_id=0) == cap  # off by default
    kept = [len(augment(cap, **{**kw, "record_id": i}).split(", ")) - 1 for i in range(400)]
    assert abs(np.mean(kept) / 5 - 0.7) < 0.05  # tag_dropout 0.3 of the 5 droppable tags
