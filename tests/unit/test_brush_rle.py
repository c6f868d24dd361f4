"""Our brush RLE is Label Studio's: byte for byte against label-studio-sdk, and it reads back what it wrote."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from core.brush_rle import decode_mask, decode_values, encode_mask, encode_values

ROOT = Path(__file__).resolve().parents[2]
LS_PYTHON = ROOT / ".venv-ls" / "bin" / "python"

# Runs in Label Studio's venv: the sdk's mask2rle of every mask, and its decode_rle of our codes.
_SDK_SCRIPT = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle
job = json.load(sys.stdin)
out = {"encoded": {}, "decoded": {}, "values": encode_rle(np.array(job["values"], dtype=int))}
for name, (h, w, flat) in job["masks"].items():
    out["encoded"][name] = mask2rle(np.array(flat, dtype=np.uint8).reshape(h, w))
for name, rle in job["ours"].items():
    out["decoded"][name] = decode_rle(rle).tolist()
json.dump(out, sys.stdout)
"""


def _blobs(h: int, w: int, seed: int, count: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:h, :w]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(count):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, max(2, min(h, w) // 3))
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return mask


def _masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "empty": np.zeros((7, 5), dtype=bool),
        "full": np.ones((3, 11), dtype=bool),
        "one_pixel_set": np.ones((1, 1), dtype=bool),
        "one_pixel_clear": np.zeros((1, 1), dtype=bool),
        # 24 values: a single 19-bit block ends the stream on a byte boundary; the sdk still pads a byte
        "byte_aligned": np.ones((2, 3), dtype=bool),
        "blobs": _blobs(37, 53, seed=1),
        "blobs_odd": _blobs(61, 17, seed=2),
        "noise": rng.random((23, 29)) > 0.5,
        "stripes": np.tile(np.arange(41) % 3 == 0, (9, 1)),
        # runs of 4 x 70000 and exactly 4 x 65536 values: split into 65536-value blocks as the sdk does
        "long_run": np.ones((1, 70000), dtype=bool),
        "run_65536": np.pad(np.ones((1, 65536), dtype=bool), ((0, 0), (1, 1))),
    }


# Runs of 1, 2..8, 9..16, 17..256, 257..65536 and over 65536 values: every block kind the sdk writes.
_VALUES = [3, 7, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 9] + [2] * 16 + [5] * 17 + [4] * 256 + [6] * 257 + [8] * 131073


@pytest.fixture(scope="module")
def sdk() -> dict:
    if not LS_PYTHON.exists():
        pytest.skip(f"Label Studio's venv is absent ({LS_PYTHON}): `make` sets it up; the sdk is the reference")
    masks = _masks()
    job = {
        "masks": {name: [*m.shape, (m * 255).astype(np.uint8).ravel().tolist()] for name, m in masks.items()},
        "ours": {name: encode_mask(m) for name, m in masks.items()},
        "values": _VALUES,
    }
    done = subprocess.run(
        [str(LS_PYTHON), "-c", _SDK_SCRIPT], input=json.dumps(job), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("name", list(_masks()))
def test_encode_matches_label_studio_sdk(sdk: dict, name: str) -> None:
    assert encode_mask(_masks()[name]) == sdk["encoded"][name]


@pytest.mark.parametrize("name", list(_masks()))
def test_sdk_decodes_ours_and_we_decode_the_sdk(sdk: dict, name: str) -> None:
    mask = _masks()[name]
    h, w = mask.shape
    rgba = np.array(sdk["decoded"][name], dtype=np.uint8).reshape(h, w, 4)
    assert (rgba == (mask * 255).astype(np.uint8)[:, :, None]).all()
    assert (decode_mask(sdk["encoded"][name], w, h) == mask).all()


def test_every_block_kind_matches_the_sdk(sdk: dict) -> None:
    assert encode_values(_VALUES) == sdk["values"]
    assert decode_values(sdk["values"]).tolist() == _VALUES


def _bits(value: int, size: int) -> str:
    return format(value, f"0{size}b")


def test_decodes_literal_blocks_as_label_studios_editor_writes_them() -> None:
    """The editor paints in the label's colour (R, G, B differ), so its code holds literal blocks."""
    pixel = [230, 25, 75, 255]
    values = pixel * 3 + [0] * 8  # 3 painted pixels, then 2 clear ones
    stream = _bits(len(values), 32) + _bits(7, 5) + "".join(_bits(s - 1, 4) for s in (3, 4, 8, 16))
    stream += "0" + "01" + _bits(12 - 1, 4) + "".join(_bits(v, 8) for v in pixel * 3)  # literal, 12 values
    stream += "1" + "00" + _bits(8 - 1, 3) + _bits(0, 8)  # repeat 0 x 8
    stream += "0" * (-len(stream) % 8)
    rle = [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]
    assert decode_values(rle).tolist() == values
    assert decode_mask(rle, 5, 1).tolist() == [[True, True, True, False, False]]


@pytest.mark.parametrize("name", list(_masks()))
def test_round_trip(name: str) -> None:
    mask = _masks()[name]
    assert (decode_mask(encode_mask(mask), mask.shape[1], mask.shape[0]) == mask).all()


def test_uint8_masks_and_alpha_threshold() -> None:
    mask = np.array([[0, 1, 255], [128, 0, 7]], dtype=np.uint8)
    assert decode_mask(encode_mask(mask), 3, 2).tolist() == [[False, True, True], [True, False, True]]
    half = encode_values(np.repeat(np.array([127, 128], dtype=np.uint8), 4))
    assert decode_mask(half, 2, 1).tolist() == [[False, True]]


def test_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="not 4x4x4"):
        decode_mask(encode_mask(np.zeros((3, 3))), 4, 4)
    with pytest.raises(ValueError, match="header"):
        decode_values([1, 2])
    with pytest.raises(ValueError, match="ends inside"):
        decode_values(encode_mask(np.eye(5))[:-3])
    with pytest.raises(ValueError, match="bytes"):
        decode_values([256, 0, 0, 0, 0, 0, 0, 0])


def test_large_mask_encodes_fast() -> None:
    mask = _blobs(1500, 2000, seed=3, count=30)
    encode_mask(mask)  # warm
    start = time.perf_counter()
    rle = encode_mask(mask)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"2000x1500 mask took {elapsed:.3f} s"
    assert (decode_mask(rle, 2000, 1500) == mask).all()
