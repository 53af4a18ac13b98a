"""What to do, as frozen dataclasses: `Scheme` (what the numbers look like) and `Recipe` (which method, on
which modules). A YAML recipe maps one to one onto `Recipe`; unknown keys are an error that names them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BitsmithError
from .numerics import FLOAT_DTYPES, GRIDS, check_bits, storage_bits


@dataclass(frozen=True, slots=True, kw_only=True)
class Scheme:
    """How one weight is represented: `bits` per code on `grid`, one scale (and zero point unless
    `symmetric`) per `group_size` consecutive input features; `group_size=None` is per output channel.
    A ragged last group is fine (576 % 128 != 0)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    grid: str = "int"
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise BitsmithError(f"unknown grid {self.grid!r}; valid grids: {', '.join(GRIDS)}")
        check_bits(self.bits)
        if self.grid != "int" and self.bits != storage_bits(self.grid, self.bits):
            object.__setattr__(self, "bits", storage_bits(self.grid, self.bits))
        if self.grid == "int" and self.symmetric and self.bits < 2:
            raise BitsmithError("a symmetric 1-bit integer grid has no levels; use grid 'binary' instead")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1
        ):
            raise BitsmithError(
                f"group size must be a positive integer or -1 for per-channel, got {self.group_size!r}"
            )
        if self.scale_dtype not in FLOAT_DTYPES:
            raise BitsmithError(f"scale_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.scale_dtype!r}")
        if self.grid != "int" and not self.symmetric:
            # Codebook, float and binary grids are scaled by absmax around zero: no zero point exists.
            object.__setattr__(self, "symmetric", True)

    @property
    def has_zero(self) -> bool:
        return self.grid == "int" and not self.symmetric

    def label(self) -> str:
        g = "pc" if self.group_size is None else f"g{self.group_size}"
        kind = f"int{self.bits}" if self.grid == "int" else self.grid
        return f"{kind}-{g}-{'sym' if self.symmetric else 'asym'}"


METHODS_WITHOUT_SCHEME = ("fp16", "bf16", "none")
DEFAULT_IGNORE = ("lm_head",)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """`method` applied with `scheme` to the modules named by `targets` minus `ignore` (glob patterns, or
    regular expressions written `re:...`). Floating tensors left unquantized are rounded to and stored at
    `keep_dtype` (None keeps them as they are)."""

    method: str = "rtn"
    scheme: Scheme = field(default_factory=Scheme)
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    method_args: dict[str, Any] = field(default_factory=dict)
    keep_dtype: str | None = "float16"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.keep_dtype is not None and self.keep_dtype not in FLOAT_DTYPES:
            raise BitsmithError(f"keep_dtype must be one of {', '.join(FLOAT_DTYPES)} or null")

    # ---- conversion ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"], d["ignore"] = list(self.targets), list(self.ignore)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise BitsmithError(f"{where} must be a mapping of recipe keys, got {type(data).__name__}")
        _check_keys(data, {f.name for f in dataclasses.fields(cls)}, where)
        data = dict(data)
        scheme = data.pop("scheme", {}) or {}
        if isinstance(scheme, dict):
            _check_keys(scheme, {f.name for f in dataclasses.fields(Scheme)}, f"{where}: scheme")
            scheme = dict(scheme)
            if scheme.get("group_size") == -1:
                scheme["group_size"] = None
            scheme = Scheme(**scheme)
        return cls(scheme=scheme, **data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise BitsmithError(f"recipe file {p} does not exist")
        try:
            import yaml
        except ImportError as e:
            raise BitsmithError("YAML recipes need PyYAML: pip install 'bitsmith[cli]'") from e
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise BitsmithError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        return cls.from_dict(data or {}, where=f"recipe {p}")

    def to_yaml(self) -> str:
        try:
            import yaml
        except ImportError:  # JSON is valid YAML, so the saved recipe stays loadable either way
            return json.dumps(self.to_dict(), indent=2) + "\n"
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def preset(cls, name: str) -> Recipe:
        if name not in PRESETS:
            raise BitsmithError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]


def _check_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BitsmithError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


PRESETS: dict[str, Recipe] = {
    "w8": Recipe(scheme=Scheme(bits=8, group_size=None)),
    "w8-sym": Recipe(scheme=Scheme(bits=8, group_size=None, symmetric=True)),
    "w4-g128": Recipe(scheme=Scheme(bits=4, group_size=128)),
    "w4-g64": Recipe(scheme=Scheme(bits=4, group_size=64)),
    "w4-g32-sym": Recipe(scheme=Scheme(bits=4, group_size=32, symmetric=True)),
    "w3-g64": Recipe(scheme=Scheme(bits=3, group_size=64)),
    "w2-g64": Recipe(scheme=Scheme(bits=2, group_size=64)),
    "nf4": Recipe(scheme=Scheme(bits=4, group_size=64, grid="nf4")),
    "fp8": Recipe(scheme=Scheme(bits=8, group_size=None, grid="fp8_e4m3", scale_dtype="float32")),
    "w8a8": Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True)),
    "w8a8-dynamic": Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True),
                           method_args={"dynamic": True}),
    "fp16": Recipe(method="fp16"),
    "bf16": Recipe(method="bf16"),
}
