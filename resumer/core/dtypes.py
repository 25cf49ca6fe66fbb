"""The one dtype table: a dtype's name (as torch spells it, without ``torch.``), its size, its safetensors code.

Pure (no torch): the signature, the manifest and the safetensors reader use it as is; the torch side
(``torch.dtype`` <-> name) lives in ``resumer.formats.torch_dtypes``, and looks names up here.

Safetensors has no code for some dtypes torch holds (complex128, complex32, float8_e8m0fnu,
float4_e2m1fn_x2; the ``safetensors`` library's torch binding does not map ``F8_E8M0``). Those are stored
as raw bytes: header dtype ``U8``, shape ``shape + [itemsize]``, while the manifest keeps the true dtype
and shape (what the reader loads by). Such a file stays readable by the ``safetensors`` library, as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

RAW_CODE = "U8"


@dataclass(frozen=True, slots=True)
class DType:
    """One dtype: its torch name, bytes per element, and safetensors code (None: stored as raw bytes)."""

    name: str
    itemsize: int
    code: str | None


TABLE: tuple[DType, ...] = (
    DType("float64", 8, "F64"), DType("float32", 4, "F32"), DType("float16", 2, "F16"),
    DType("bfloat16", 2, "BF16"),
    DType("complex128", 16, None), DType("complex64", 8, "C64"), DType("complex32", 4, None),
    DType("float8_e4m3fn", 1, "F8_E4M3"), DType("float8_e5m2", 1, "F8_E5M2"),
    DType("float8_e4m3fnuz", 1, "F8_E4M3FNUZ"), DType("float8_e5m2fnuz", 1, "F8_E5M2FNUZ"),
    DType("float8_e8m0fnu", 1, None), DType("float4_e2m1fn_x2", 1, None),
    DType("int64", 8, "I64"), DType("int32", 4, "I32"), DType("int16", 2, "I16"), DType("int8", 1, "I8"),
    DType("uint64", 8, "U64"), DType("uint32", 4, "U32"), DType("uint16", 2, "U16"), DType("uint8", 1, "U8"),
    DType("bool", 1, "BOOL"),
)
BY_NAME = {d.name: d for d in TABLE}
_BY_CODE = {d.code: d for d in TABLE if d.code is not None}


def known(name: str) -> bool:
    """Whether a checkpoint may hold this dtype."""
    return name in BY_NAME


def itemsize(name: str) -> int:
    """Bytes per element; ValueError for a dtype not in the table."""
    return lookup(name).itemsize


def lookup(name: str) -> DType:
    """The table row of ``name``; ValueError names the dtype when it is not in the table."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}") from None


def from_code(code: str) -> str:
    """The dtype name of a safetensors header code; ValueError for an unknown code."""
    try:
        return _BY_CODE[code].name
    except (KeyError, TypeError):
        raise ValueError(f"unknown safetensors dtype {code!r}") from None


def header_layout(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """How a tensor of ``name`` and ``shape`` is described in a safetensors header: (code, shape).

    A dtype without a safetensors code is written as raw bytes (see the module docstring).
    """
    d = lookup(name)
    if d.code is None:
        return RAW_CODE, (*shape, d.itemsize)
    return d.code, shape


def stored_as(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """(dtype name, shape) that reading the header back yields for a tensor of ``name`` and ``shape``."""
    code, header_shape = header_layout(name, shape)
    return from_code(code), header_shape
