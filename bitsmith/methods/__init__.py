"""One file per method, each `quantize(weight, stats, scheme, **args) -> QWeight` plus `NEEDS`, the
calibration statistics it wants (empty for data-free methods). METHODS is the whole registry."""

from __future__ import annotations

from types import ModuleType

from ..errors import BitsmithError
from . import awq, gptq, rtn

METHODS: dict[str, ModuleType] = {"rtn": rtn, "gptq": gptq, "awq": awq}
from . import hqq, incoherence, llm_int8, nf4, quip  # noqa: E402  (issue 5)

METHODS.update({"hqq": hqq, "nf4": nf4, "llm_int8": llm_int8, "incoherence": incoherence, "quip": quip})
from . import w8a8  # noqa: E402  (issue 7: activation quantization)

METHODS["w8a8"] = w8a8
# Methods that are not a weight quantizer: they only round the model to a float dtype.
CAST_METHODS = {"fp16": "float16", "bf16": "bfloat16", "none": None}


def get(name: str) -> ModuleType:
    if name not in METHODS:
        valid = ", ".join([*METHODS, *CAST_METHODS])
        raise BitsmithError(f"unknown method {name!r}; valid methods: {valid}")
    return METHODS[name]


def names() -> list[str]:
    return [*METHODS, *CAST_METHODS]
