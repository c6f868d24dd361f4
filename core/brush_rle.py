"""Label Studio's brush RLE, in numpy: what a ``brushlabels`` result's ``value.rle`` holds.

Label Studio stores a brush region as an RGBA image of the whole picture, flattened row by row
(``R, G, B, A`` per pixel) and packed with thi.ng's ``rle-pack`` bit format:

- a header: the value count (32 bits), word size - 1 (5 bits, 8 for bytes), and four run-length
  field sizes - 1 (4 bits each; ``[3, 4, 8, 16]``);
- then blocks: 1 bit "repeat", 2 bits picking a field size, ``run length - 1`` in that many bits,
  and then one value (repeat) or that many values (literal), each ``word size`` bits;
- padded with zero bits to whole bytes, and the bytes are the list of ints.

:func:`encode_mask` writes exactly what ``label_studio_sdk.converter.brush.mask2rle`` writes for the
same mask at 255 (every channel 255 where set, so Label Studio draws it in the label's colour),
byte for byte, including the sdk's quirks: a run of one value is a one-value literal block, runs
longer than 65536 are split into repeats of 65536 and the rest, all with the 16-bit field, and a
stream that already ends on a byte boundary still gets one zero byte of padding. It runs on runs,
not on pixels, so a 2000x1500 mask of blobs encodes in about 30 ms.

:func:`decode_mask` reads any stream of the format (Label Studio's own editor writes literal
blocks with the label's colour), as ``decode_rle`` does, and keeps the alpha channel: a pixel is
set when its alpha is above 127, the half way point of the 0/255 masks Label Studio draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["CHANNELS", "decode_mask", "decode_values", "encode_mask", "encode_values"]

CHANNELS = 4  # RGBA
_WORD_BITS = 8
_RLE_SIZES = (3, 4, 8, 16)
_MAX_RUN = 1 << _RLE_SIZES[-1]  # the longest run one block holds
_HEADER_BITS = 32 + 5 + 4 * len(_RLE_SIZES)
_ALPHA_SET = 127


def _header() -> str:
    sizes = "".join(f"{size - 1:04b}" for size in _RLE_SIZES)
    return f"{_WORD_BITS - 1:05b}{sizes}"


def _runs(values: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Lengths and values of the runs of equal values (as the sdk's ``base_rle_encode``)."""
    ends = np.flatnonzero(values[1:] != values[:-1])
    ends = np.append(ends, values.size - 1)
    lengths = np.diff(np.concatenate(([-1], ends)))
    return lengths.astype(np.int64), values[ends].astype(np.int64)


def _pack(lengths: npt.NDArray[np.int64], values: npt.NDArray[np.int64], count: int) -> list[int]:
    """The byte list of runs, bit for bit as the sdk's ``encode_rle`` packs them."""
    # Field-size index per run: 0 for 1..8 (a single value is a literal block, flag 0, length 0),
    # 1 for 9..16, 2 for 17..256, 3 beyond; runs over 65536 become several 16-bit blocks.
    index = np.searchsorted(np.array([8, 16, 256]), lengths, side="left")
    pieces = np.where(index == 3, -(-lengths // _MAX_RUN), 1)
    run_of = np.repeat(np.arange(lengths.size), pieces)
    first = np.cumsum(pieces) - pieces
    piece_no = np.arange(run_of.size) - first[run_of]
    last = piece_no == pieces[run_of] - 1
    block_len = np.where(last, lengths[run_of] - _MAX_RUN * piece_no, _MAX_RUN)
    block_index = index[run_of]
    size_bits = np.array(_RLE_SIZES, dtype=np.int64)[block_index]
    flag = (lengths[run_of] > 1).astype(np.int64)
    code = (flag << 2 | block_index) << size_bits | (block_len - 1)
    code = code << _WORD_BITS | values[run_of]
    width = 3 + size_bits + _WORD_BITS  # at most 27 bits
    # Left-align every code in 32 bits, unpack, keep each code's first ``width`` bits in order.
    aligned = (code << (32 - width)).astype(">u4")
    bits = np.unpackbits(aligned.view(np.uint8).reshape(-1, 4), axis=1)
    body = bits[np.arange(32) < width[:, None]]
    head = np.frombuffer((f"{count:032b}" + _header()).encode("ascii"), dtype=np.uint8) - ord("0")
    stream = np.concatenate((head, body))
    pad = 8 - stream.size % 8  # the sdk pads 1..8 bits: a byte-aligned stream gets a zero byte
    stream = np.concatenate((stream, np.zeros(pad, dtype=np.uint8)))
    packed: list[int] = np.packbits(stream).tolist()
    return packed


def encode_values(values: npt.ArrayLike) -> list[int]:
    """Label Studio's RLE of a flat array of byte values (``encode_rle`` of the sdk, 8-bit words)."""
    flat = np.asarray(values).ravel()
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise ValueError("brush RLE values are bytes (0..255)")
    flat = flat.astype(np.uint8)
    if flat.size == 0:
        return _pack(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    lengths, run_values = _runs(flat)
    return _pack(lengths, run_values, flat.size)


def encode_mask(mask: npt.ArrayLike) -> list[int]:
    """A (H, W) mask (bool, or nonzero where set) as a ``brushlabels`` ``rle``: RGBA 255 where set.

    The same list ``label_studio_sdk.converter.brush.mask2rle(mask * 255)`` returns. Runs are found
    per pixel and stretched to the four channels, so the RGBA image is never built.
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {array.shape}")
    pixels = np.where(array.ravel() != 0, 255, 0).astype(np.uint8)
    if pixels.size == 0:
        return _pack(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    lengths, values = _runs(pixels)
    return _pack(lengths * CHANNELS, values, pixels.size * CHANNELS)


def decode_values(rle: Sequence[int]) -> npt.NDArray[np.uint32]:
    """Every value a Label Studio RLE holds (``decode_rle`` of the sdk, any word and field sizes)."""
    data = np.asarray(rle, dtype=np.int64)
    if data.ndim != 1 or (data.size and (data.min() < 0 or data.max() > 255)):
        raise ValueError("a brush RLE is a list of bytes (0..255)")
    bits = np.unpackbits(data.astype(np.uint8))
    text = (bits + ord("0")).tobytes().decode("ascii")
    if bits.size < _HEADER_BITS:
        raise ValueError("brush RLE is shorter than its header")

    def read(pos: int, size: int) -> int:
        if pos + size > bits.size:
            raise ValueError("brush RLE ends inside a block")
        return int(text[pos : pos + size], 2)

    count = read(0, 32)
    word = read(32, 5) + 1
    sizes = [read(37 + 4 * k, 4) + 1 for k in range(4)]
    weights = (1 << np.arange(word - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)
    out = np.zeros(count, dtype=np.uint32)
    i, pos = 0, _HEADER_BITS
    while i < count:
        repeat = read(pos, 1) == 1
        size = sizes[read(pos + 1, 2)]
        end = min(i + 1 + read(pos + 3, size), count)
        pos += 3 + size
        if repeat:
            out[i:end] = read(pos, word)
            pos += word
        else:
            n = end - i
            if pos + n * word > bits.size:
                raise ValueError("brush RLE ends inside a block")
            chunk = bits[pos : pos + n * word].reshape(n, word).astype(np.uint64)
            out[i:end] = (chunk @ weights).astype(np.uint32)
            pos += n * word
        i = end
    return out


def decode_mask(rle: Sequence[int], width: int, height: int) -> npt.NDArray[np.bool_]:
    """The (height, width) mask of a ``brushlabels`` ``rle``: pixels whose alpha is above 127."""
    values = decode_values(rle)
    if values.size != width * height * CHANNELS:
        raise ValueError(
            f"brush RLE holds {values.size} values, not {width}x{height}x{CHANNELS} = {width * height * CHANNELS}"
        )
    mask: npt.NDArray[np.bool_] = values.reshape(height, width, CHANNELS)[:, :, CHANNELS - 1] > _ALPHA_SET
    return mask
