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


# ---- Hadamard matrices -------------------------------------------------------------------------------
# Incoherence processing (QuIP#) needs an orthogonal H of every weight dimension n. Sylvester's construction
# covers powers of two; LLM widths like 576 = 36 * 16 and 1536 = 12 * 128 need a dense Hadamard factor of
# order 4m (m odd) next to a power of two: H_n = H_4m (x) H_(n/4m) is again Hadamard. Paley's constructions
# give H_4m whenever 4m - 1 (Paley I) or 2m - 1 (Paley II) is prime: 12, 20, 28, 36, 44, 60, 76, ...
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) Q[i, j] = Legendre symbol of (j - i) mod q, for a prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def _paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of `order` (a multiple of 4) by Paley I or II with a prime q, or None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:                        # Paley I: H = I + S, S skew conference matrix
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(order, dtype=torch.float64) + s
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:    # Paley II: symmetric conference matrix, doubled
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, one) + torch.kron((c == 0).double(), zero)
    return None


def hadamard_factors(n: int) -> tuple[torch.Tensor | None, int, int]:
    """How bitsmith's orthogonal transform of size n is built: (dense, p, blocks) with n = blocks * d * p.

    `dense` is a (d, d) +-1 Hadamard matrix (None when d = 1) and p a power of two (Sylvester, applied by the
    fast Walsh-Hadamard transform): the transform is I_blocks (x) H_d (x) H_p, normalised. blocks > 1 only
    when no Hadamard of the needed order is known here (n = 2^a * m, m odd, neither 4m - 1 nor 2m - 1
    prime): then it is block-diagonal with 2^a-sized Walsh-Hadamard blocks, exactly orthogonal but mixing
    only within a block (for odd n it is the identity and only the random signs remain)."""
    if n < 1:
        raise BitsmithError(f"a Hadamard transform needs a positive size, got {n}")
    p2 = n & -n                                           # largest power of two dividing n
    m = n // p2
    if m == 1:
        return None, n, 1
    if p2 >= 4:
        h = _paley(4 * m)
        if h is not None:
            return h.float(), p2 // 4, 1
    return None, p2, m


def hadamard_supported(n: int) -> bool:
    """True when the transform of size n is a full Hadamard (mixes all n coordinates)."""
    return hadamard_factors(n)[2] == 1


# Double quantization (QLoRA): the per-block absmax constants are themselves stored as 8-bit codes in flat
# blocks of this many, each block with one fp32 absmax; with NF4 block 64: 4 + 8/64 + 32/(64*256) = 4.127 bpw.
DQ_BLOCK = 256
