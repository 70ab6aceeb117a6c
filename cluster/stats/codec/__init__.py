"""The binary form of one window in Redis: a small header, then each statistic in a compact exact encoding.

Layout (little endian):

    header  "EMW1" | u8 version (4) | u8 flags | u16 0 | u32 L | u32 E | u32 k | f64 tokens | u32 deltas
            [ | u32 first layer | u32 share layers ]   (when flags has SHARE: a layer share)
    array   u8 layout | u8 value bits | u8 index bytes | u8 value kind | u8 excess bytes | u64 cells | u64 nnz
            | u64 overflow | layout part | packed values | overflow cell indices | overflow excess
            (counts, then coact and trans when flags has PAIRS, then trans_top1 when it also has TOP1)

Layouts of an array of `n` non-negative cells with `nnz` non-zeros:

    DENSE   every cell's value                                                 n values
    BITMAP  one bit per cell (is it non-zero), then the non-zero values        n / 8 bytes + nnz values
    COO     the flat index of each non-zero cell (u16/u32/u64), then values    nnz * index + nnz values
    GROUPS  cells in groups of 4, G = ceil(n / 4), the last one padded with zeros: every
            cell's 4-bit value (0 in hot groups), then for the `overflow` hot groups (a cell above 15)
            the gap from the previous hot group (the first from group 0) in `index bytes` (1/2/4/8),
            then their 4 cells each in `value bits` (8 or 16)        2G + hot x (index + 4 values)

Values are packed in 4, 8, 16, 32 or 64 bits. In DENSE, BITMAP and COO a value too large for the width is
written as the width's all-ones escape and patched from the overflow list (cell index, excess over the
escape in the narrowest unsigned type), so a few hot cells do not widen every cell. The encoder picks the
width and layout with the fewest bytes, but keeps the fastest to write (GROUPS where it applies, else
DENSE, also the fastest to read) unless another layout saves a quarter of them.

Why this form: co-activation and transition matrices are sparse for short windows and small top-k (most of
the E^2 cells are zero: COO or BITMAP win), but a DeepSeek-V3 writer window (4096 tokens x 28 pairs into
32,640 cells per layer) fills 85-97% of them, where any index costs more than the value it locates: there,
4-bit values (a writer's counts per cell are mostly below 15) take half a byte per cell, 1/128 of the int64
arrays. About 3% of a writer window's cells exceed 4 bits. Patching each from a list of cell indices needs
a search over every cell (np.nonzero, the largest part of a flush's encoding); GROUPS finds hot groups with
one 64-bit test per four uint16 cells and searches only the groups, and its gap-coded group list is smaller
than a cell list (3.46 vs 3.62 MB a writer window).
Float arrays (the decayed aggregate) use DENSE, BITMAP or COO with f8 values. The header names the shape and
the version, so a window of another model, of another format version, or bytes that are not ours, are
refused before any arithmetic. One version is written and read: 4 (earlier ones were never released).

A layer share (`window.WindowCounts`) names the model's L in the header, then its own first layer
and layer count; its arrays have the share's rows and add into those rows of a whole window's accumulator.
"""

from __future__ import annotations

from .decode import accumulator_for, add_window_into, decode_window, sum_windows, value_bound, value_bounds
from .encode import encode_window
from .format import BITMAP, COO, DENSE, GROUPS, MAGIC, VERSION, CodecError, encoded_header

__all__ = [
    "encode_window",
    "decode_window",
    "add_window_into",
    "sum_windows",
    "value_bound",
    "value_bounds",
    "accumulator_for",
    "encoded_header",
    "CodecError",
    "MAGIC",
    "VERSION",
    "DENSE",
    "BITMAP",
    "COO",
    "GROUPS",
]
