"""Number systems as data: integer grids, 4-bit codebooks (NF4, FP4), FP8 formats, binary and ternary.

Nothing here quantizes anything; `primitives.py` does the math. A grid answers two questions: which codes
exist, and what real value (before scaling) each code stands for. Codes are always stored *unsigned*
(0 .. 2**bits - 1) so that packing never sees a sign; a signed integer grid is the unsigned one shifted by
its offset (`IntGrid.offset`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BitsmithError

GRIDS = ("int", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2", "binary", "ternary")


@dataclass(frozen=True, slots=True)
class IntGrid:
    """The integers [qmin, qmax] of a `bits`-wide signed or unsigned integer."""

    bits: int
    signed: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def offset(self) -> int:
        """What to add to a code of this grid to store it unsigned."""
        return -self.qmin


def check_bits(bits: int, low: int = 1, high: int = 8) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
        raise BitsmithError(f"bits must be an integer from {low} to {high}, got {bits!r}")
    return bits


# NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, Dettmers et al. 2023,
# appendix E). These are the float32 values bitsandbytes and llama.cpp's IQ4_NL-like tables use.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (e2m1, no inf/nan): magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, normalised by 6 so absmax scaling maps to 1.
_FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# All 16 e2m1 codes sorted by value, -0 and +0 both present, so lookups by midpoint (bucketize) work.
FP4_CODEBOOK = tuple(-m / 6.0 for m in reversed(_FP4_MAGNITUDES)) + tuple(m / 6.0 for m in _FP4_MAGNITUDES)

BINARY_LEVELS = (-1.0, 1.0)           # code 0 -> -1, code 1 -> +1
TERNARY_LEVELS = (-1.0, 0.0, 1.0)     # codes 0, 1, 2 (2 bits of storage)

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {name: float(torch.finfo(dt).max) for name, dt in FP8_DTYPES.items()}   # 448.0, 57344.0

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def codebook(grid: str) -> torch.Tensor | None:
    """The real value of each code for a codebook grid, or None for grids that are not a lookup table."""
    table = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK, "binary": BINARY_LEVELS, "ternary": TERNARY_LEVELS}
    values = table.get(grid)
    return None if values is None else torch.tensor(values, dtype=torch.float32)


def storage_bits(grid: str, bits: int) -> int:
    """How many bits one code takes in storage for `grid` (the int grid uses `bits` itself)."""
    fixed = {"nf4": 4, "fp4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8, "binary": 1, "ternary": 2}
    if grid == "int":
        return check_bits(bits)
    if grid not in fixed:
        raise BitsmithError(f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}")
    return fixed[grid]


def float_dtype(name: str) -> torch.dtype:
    if name not in FLOAT_DTYPES:
        raise BitsmithError(f"unknown float dtype {name!r}; valid: {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
