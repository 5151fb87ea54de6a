"""Bad input on a generated corpus: every file gets its documented treatment, counted."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxcond.data import files, pipeline

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
    decoded = {r.path.rsplit("/", 1)[1]: pipeline.decode(r.path, SIZE, report) for r in records}
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
    assert c["converted: L to RGB"] == 1 and c["converted: I;16 (16-bit) to 8-bit RGB"] == 1
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
    wide = pipeline.decode(str(corpus / "banner.png"), [(16, 16), (16, 15000), (16, 24)], report)
    assert wide.pixels.shape == (16, 15000, 3)  # kept: it has a bucket of its shape
    assert report.counts == {"upscaled: smaller than 16x15000": 1}  # (3 pixels tall)
    ok = pipeline.decode(str(corpus / "ok.png"), [(16, 16), (16, 15000), (16, 24)], report)
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
    small = pipeline.decode(str(corpus / "small.png"), SIZE, report, too_small="skip")
    assert small is None and report.counts[f"skipped: smaller than {SIZE}x{SIZE}"] == 1


def test_random_crop_is_deterministic_from_the_rng(corpus):
    path = str(corpus / "ok.png")
    a = pipeline.decode(path, SIZE, files.Report(), crop="random", rng=np.random.default_rng(3))
    b = pipeline.decode(path, SIZE, files.Report(), crop="random", rng=np.random.default_rng(3))
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


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16_rgb(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _tiff(pixels: np.ndarray, photometric: int, extra_samples: int | None = None) -> bytes:
    """An uncompressed little-endian TIFF of uint8/uint16 [h, w, samples]: Pillow writes
    neither 16-bit RGB nor premultiplied grey+alpha (ExtraSamples 1)."""
    h, w, spp = pixels.shape
    bits, data = pixels.dtype.itemsize * 8, pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    tags = [(256, w), (257, h), (258, None), (259, 1), (262, photometric), (273, None), (277, spp), (278, h),
            (279, len(data))] + ([(338, extra_samples)] if extra_samples is not None else [])
    bits_at = 8 + 2 + 12 * len(tags) + 4  # after the header and the one directory
    data_at = bits_at + 2 * spp
    ifd = b""
    for tag, value in tags:
        if tag == 258:  # BitsPerSample: inline when two shorts fit, else where bits_at points
            body = struct.pack("<HH", bits, bits if spp == 2 else 0) if spp <= 2 else struct.pack("<I", bits_at)
            ifd += struct.pack("<HHI", tag, 3, spp) + body
        else:
            ifd += struct.pack("<HHII", tag, 4, 1, data_at if tag == 273 else value)
    return (b"II*\0" + struct.pack("<IH", 8, len(tags)) + ifd + b"\0\0\0\0"
            + struct.pack(f"<{spp}H", *[bits] * spp) + data)


def _palette_alpha() -> Image.Image:
    """Palette indices 0..3 with alphas 255, 0, 128, 255."""
    img = Image.fromarray(np.array([[[0, 255], [1, 0]], [[2, 128], [3, 255]]], np.uint8), "PA")
    img.putpalette([200, 30, 30, 10, 220, 40, 0, 0, 255, 128, 128, 128])
    return img


def _on_white(value: float, alpha: int) -> float:
    return value * alpha / 255 + 255 * (1 - alpha / 255)


GREYS = np.array([[0, 255], [128, 7]], np.uint8)
COLOURS = np.array([[[200, 30, 30], [10, 220, 40]], [[0, 0, 255], [128, 128, 128]]], np.uint8)
CMYK = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 0, 0, 255], [0, 255, 255, 0]]], np.uint8)
RGB16 = np.array([[[65535, 0, 32896], [1000, 51400, 65535]]], np.uint16)

# (mode name, encoded file or in-memory image, expected RGB [h, w, 3], counted treatment, tolerance)
MODES = [
    ("1", _encoded(Image.fromarray(GREYS > 100), "PNG"), np.where(GREYS > 100, 255, 0), "converted: 1 to RGB", 0),
    ("L", _encoded(Image.fromarray(GREYS), "PNG"), GREYS, "converted: L to RGB", 0),
    ("P", _encoded(Image.fromarray(COLOURS).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"),
     COLOURS, "converted: P to RGB", 0),
    ("RGB 16-bit PNG", _png16_rgb(RGB16), RGB16 / 65535 * 255, None, 1),
    ("RGB 16-bit TIFF", _tiff(RGB16, photometric=2), RGB16 / 65535 * 255, None, 1),
    ("RGBA", _encoded(Image.fromarray(np.array([[[200, 30, 30, 255], [0, 0, 255, 0]]], np.uint8)), "PNG"),
     np.array([[[200, 30, 30], [255, 255, 255]]]), "composited on white: transparency", 0),
    ("LA", _encoded(Image.fromarray(np.array([[[100, 255], [0, 0], [200, 128]]], np.uint8), "LA"), "PNG"),
     np.array([[[100] * 3, [255] * 3, [round(_on_white(200, 128))] * 3]]), "composited on white: transparency", 1),
    ("PA", _encoded(_palette_alpha(), "TIFF"), np.array([[[200, 30, 30], [255, 255, 255]], [[127, 127, 255], [128] * 3]]),
     "composited on white: transparency", 1),
    ("La (premultiplied)", _tiff(np.array([[[64, 128], [255, 255]]], np.uint8), photometric=1, extra_samples=1),
     np.array([[[64 + 255 - 128] * 3, [255] * 3]]), "composited on white: transparency", 1),
    ("RGB with a transparent colour (PNG tRNS)", _encoded(Image.fromarray(COLOURS), "PNG", transparency=(0, 0, 255)),
     np.where(COLOURS == (0, 0, 255), 255, COLOURS), "composited on white: transparency", 0),
    ("CMYK TIFF", _encoded(Image.fromarray(CMYK, "CMYK"), "TIFF"),
     np.array([[[255, 255, 255], [0, 255, 255]], [[0, 0, 0], [255, 0, 0]]]), "converted: CMYK to RGB", 0),
    ("CMYK JPEG (Adobe, inverted)", _encoded(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG"),
     np.full((8, 8, 3), (0, 255, 255)), "converted: CMYK to RGB", 3),
    ("YCbCr", _encoded(Image.fromarray(COLOURS).convert("YCbCr"), "TIFF"), COLOURS, "converted: YCbCr to RGB", 2),
    ("LAB", _encoded(Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0], [128, 0, 0]]], np.uint8), "LAB"), "TIFF"),
     np.array([[[255] * 3, [0] * 3, [119] * 3]]), "converted: LAB to RGB", 2),  # L* 50.2 is sRGB 119
    ("I;16", _encoded(Image.fromarray(np.array([[0, 65535], [32896, 1000]], np.uint16)), "PNG"),
     np.array([[0, 255], [128, 4]]), "converted: I;16 (16-bit) to 8-bit RGB", 0),
    ("I;16B", _encoded(Image.frombytes("I;16B", (2, 2), np.array([[0, 65535], [32896, 1000]], ">u2").tobytes()),
                       "TIFF"),
     np.array([[0, 255], [128, 4]]), "converted: I;16B (16-bit) to 8-bit RGB", 0),
    ("I 0..255", _encoded(Image.fromarray(GREYS.astype(np.int32)), "TIFF"), GREYS,
     "converted: I (32-bit integer, read as 0..255) to 8-bit RGB", 0),
    ("I 0..65535", _encoded(Image.fromarray(np.array([[0, 65535], [32896, 1000]], np.int32)), "TIFF"),
     np.array([[0, 255], [128, 4]]), "converted: I (32-bit integer, read as 0..65535) to 8-bit RGB", 0),
    ("F 0..1", _encoded(Image.fromarray(np.array([[0, 1], [0.5, 0.25]], np.float32)), "TIFF"),
     np.array([[0, 255], [128, 64]]), "converted: F (32-bit float, read as 0..1) to 8-bit RGB", 0),
    ("F 0..255", _encoded(Image.fromarray(np.array([[0, 255], [300, -5], [128.4, 2]], np.float32)), "TIFF"),
     np.array([[0, 255], [255, 0], [128, 2]]), "converted: F (32-bit float, read as 0..255) to 8-bit RGB", 0),
]


@pytest.mark.parametrize("name, encoded, want, treatment, atol", MODES, ids=[m[0] for m in MODES])
def test_every_colour_mode_gives_the_right_pixels(name, encoded, want, treatment, atol):
    assert Image.open(io.BytesIO(encoded)).mode == name.split()[0]  # the mode under test is what Pillow reads
    report = files.Report()
    img = files.load_image(name, report, data=encoded)
    pixels = np.asarray(img)
    want = np.asarray(want, float)
    want = want if want.ndim == 3 else np.repeat(want[..., None], 3, -1)
    assert img.mode == "RGB" and pixels.shape == want.shape
    np.testing.assert_allclose(pixels, want, atol=atol)
    assert report.counts == ({treatment: 1} if treatment else {})


@pytest.mark.parametrize("mode, pixels, want", [
    ("HSV", [[[0, 255, 255], [85, 255, 255]], [[170, 255, 255], [0, 0, 128]]],
     [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [128, 128, 128]]]),
    ("RGBX", [[[200, 30, 30, 0]]], [[[200, 30, 30]]]),
    ("RGBa", [[[100, 50, 25, 128]]], [[[_on_white(200, 128), _on_white(100, 128), _on_white(50, 128)]]]),
])
def test_modes_only_built_in_memory(mode, pixels, want):
    """Pillow writes none of these to a format that reads back in the same mode."""
    img = Image.fromarray(np.array(pixels, np.uint8), mode)
    got = files._to_rgb(img, "x", files.Report())
    np.testing.assert_allclose(np.asarray(got), want, atol=2)


def test_float_images_with_nan_or_infinity_are_skipped_and_unknown_modes_named(monkeypatch):
    for bad in (np.nan, np.inf):
        report = files.Report()
        tiff = _encoded(Image.fromarray(np.array([[0.5, bad]], np.float32)), "TIFF")
        assert files.load_image("f.tif", report, data=tiff) is None
        assert report.counts == {"skipped: non-finite pixel values (NaN or infinity)": 1}
    monkeypatch.setattr(files, "_CONVERTED", ())  # as if Pillow gave a mode this code does not know
    report = files.Report()
    assert files.load_image("cmyk.tif", report, data=_encoded(Image.fromarray(CMYK, "CMYK"), "TIFF")) is None
    assert report.counts == {"skipped: unsupported colour mode (CMYK)": 1}


def test_a_float_image_trains_its_pixels_not_black():
    tiff = _encoded(Image.fromarray(np.full((20, 20), 0.5, np.float32)), "TIFF")
    dec = pipeline.decode("f.tif", SIZE, files.Report(), data=tiff)
    assert (dec.pixels == 128).all()
