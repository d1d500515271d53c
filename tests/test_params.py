"""The kernels' parameter structs: cupyflash/params.py's layouts against kernels_cu/params.cuh, checked by the C++
compiler (NVRTC compiles a static_assert of every field's offset, size and type and of each struct's size and
alignment; no GPU needed) and by the field names in order; and the packing of values into them."""
from __future__ import annotations

import ctypes
import re
import struct

import pytest

from cupyflash import jit, params, tma

CPP_TYPES = {"int": "int", "u32": "u32", "i64": "i64", "float": "float", "TmaDesc": "cupyflash::TmaDesc"}
KERNEL_PARAM_LIMIT = 4096  # bytes of kernel parameters the brief allows (CUDA's classic limit)


def _checks(structs) -> str:
    """A translation unit: params.cuh, then static_asserts of each struct in `structs` as described in Python."""
    lines = [jit._inline(jit.kernel_dir() / "params.cuh", set()),
             "template <typename A, typename B> struct same { static constexpr bool value = false; };",
             "template <typename A> struct same<A, A> { static constexpr bool value = true; };",
             "template <typename A> struct ptr { static constexpr bool value = false; };",
             "template <typename A> struct ptr<A*> { static constexpr bool value = true; };"]
    for s in structs:
        t = f"cupyflash::{s.c_type}"
        lines += [f'static_assert(sizeof({t}) == {s.size}, "sizeof({s.c_type}) != {s.size}");',
                  f'static_assert(alignof({t}) == {s.align}, "alignof({s.c_type}) != {s.align}");']
        for name, kind in s.fields:
            field = f"decltype({t}::{name})"
            where = f"{s.c_type}.{name}"
            lines.append(f'static_assert(__builtin_offsetof({t}, {name}) == {s.offsets[name]}, '
                         f'"offset of {where} != {s.offsets[name]}");')
            if kind is params.PTR:
                want = f"ptr<{field}>::value"
            elif isinstance(kind, params.Struct):
                want = f"same<{field}, cupyflash::{kind.c_type}>::value"
            else:
                want = f"same<{field}, {CPP_TYPES[kind.c_type]}>::value"
            lines.append(f'static_assert({want}, "{where} is not a {kind.c_type}");')
    return "\n".join(lines) + "\n"


def _compile_errors(source: str) -> list[str]:
    """NVRTC's error lines for `source` (none: it compiled)."""
    nvrtc = jit._nvrtc()
    prog = nvrtc.createProgram(source, "params_layout.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["-std=c++17", "-arch=sm_90a"])
            return []
        except Exception:
            return [ln for ln in nvrtc.getProgramLog(prog).splitlines() if "error" in ln]
    finally:
        nvrtc.destroyProgram(prog)


@pytest.fixture(scope="module", autouse=True)
def _nvrtc_available():
    try:
        jit._nvrtc()
    except Exception as err:
        pytest.skip(f"NVRTC cannot be loaded ({type(err).__name__}: {err})")


def test_python_layouts_match_the_cpp_structs():
    assert _compile_errors(_checks(params.STRUCTS)) == []


@pytest.mark.parametrize("layout,change,message", [
    (params.FWD, lambda f: [f[1], f[0], *f[2:]], "offset of"),  # two fields swapped
    (params.CONVERT_DQ, lambda f: [(n, params.U32 if t is params.I32 else t) for n, t in f], "is not a u32"),
    (params.ATTN, lambda f: [*f[:3], ("scale_log2", params.I32)], "is not a int"),  # float read as int
    (params.FWD, lambda f: f[:-1], "sizeof"),  # the last field dropped
])
def test_a_layout_that_disagrees_fails_to_compile(layout, change, message):
    wrong = params.Struct(layout.c_type, change(list(layout.fields)))
    errors = _compile_errors(_checks([wrong]))
    assert errors and any(message in e for e in errors), errors


def _cpp_field_names() -> dict:
    """struct name → its field names in order, read from params.cuh's text."""
    text = re.sub(r"//[^\n]*", "", (jit.kernel_dir() / "params.cuh").read_text())
    out = {}
    for name, body in re.findall(r"struct (?:alignas\(\d+\) )?(\w+) \{(.*?)\n\};", text, re.S):
        names = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            first, *rest = decl.split(",")
            names += [first.split()[-1].lstrip("*"), *(r.strip().lstrip("*") for r in rest)]
        out[name] = names
    return out


def test_field_names_in_order_match():
    """A field added to one side in the other's padding keeps every offset and size: the names catch it."""
    cpp = _cpp_field_names()
    for s in params.STRUCTS:
        assert cpp[s.c_type.split("<")[0]] == [n for n, _ in s.fields], s.c_type
    assert set(cpp) == {s.c_type.split("<")[0] for s in params.STRUCTS} | {"TmaDesc"}


def test_every_kernel_struct_fits_the_parameter_limit():
    for kernel, s in params.KERNEL_STRUCTS.items():
        assert s.size <= KERNEL_PARAM_LIMIT, (kernel, s.size)
    assert set(params.KERNEL_STRUCTS) == set(jit.KERNELS)
    assert [s for s in params.KERNEL_STRUCTS.values() if s.positional] == [params.BWD_SM90_ARGS]


def test_tma_maps_are_64_byte_aligned():
    maps = [params.FWD_SM90.offsets[n] for n, t in params.FWD_SM90.fields if t is params.TMA]
    assert maps and all(at % 64 == 0 for at in maps) and params.FWD_SM90.align == 64


def _signature(kernel: str) -> list:
    """(C type, name) of each parameter of __global__ `kernel` in kernels_cu."""
    text = "\n".join(p.read_text() for p in jit.kernel_dir().glob("*.cuh"))
    params_text = re.search(rf"\b{kernel}\(([^)]*)\)\s*{{", text).group(1)
    out = []
    for decl in (d.strip() for d in params_text.split(",")):
        name = decl.split()[-1]
        out.append(("pointer" if "*" in decl else decl.split()[-2], name))
    return out


def test_the_hopper_backwards_parameter_list_matches():
    """The one kernel taking its parameters one by one: each in order, by name and C type, one kernelParams pointer
    at each."""
    layout = params.BWD_SM90_ARGS
    assert layout.positional and layout.param_offsets == tuple(layout.offsets[n] for n, _ in layout.fields)
    assert _signature(layout.c_type) == [(t.c_type, n) for n, t in layout.fields]


def test_pack_puts_each_value_at_its_offset_and_lists_the_slots():
    values = dict(dq_accum=params.Slot("dq_accum"), dq=0x1234_5678_9ABC, dq_s=(-3, 5, 7), H=12, Nq=3000,
                  n_rows=1 << 40, scale=0.1)
    packed = params.CONVERT_DQ.pack(values)
    assert len(packed.template) == params.CONVERT_DQ.size == 64
    assert packed.slots == ((0, params.Slot("dq_accum")),)
    assert struct.unpack_from("<Q3qiiqf", packed.template, 8) == (0x1234_5678_9ABC, -3, 5, 7, 12, 3000, 1 << 40,
                                                                   struct.unpack("<f", struct.pack("<f", 0.1))[0])
    filled = packed.filled({"dq_accum": 0xDEAD_BEEF_0000})
    assert struct.unpack_from("<Q", filled)[0] == 0xDEAD_BEEF_0000 and filled[8:] == packed.template[8:]
    assert packed.values["dq_s.h"] == 5


def test_a_tma_slot_writes_the_map_of_each_call_s_address(monkeypatch):
    """TmaSlot.writer remembers maps by address for its slot: each address still gets its own map, a repeated one
    the map encoded for it."""
    encoded = []

    def encode(desc, *args):
        address = args[2].value
        ctypes.memmove(desc, address.to_bytes(8, "little") * 16, tma.MAP_BYTES)
        encoded.append(address)
        return 0

    monkeypatch.setattr(tma, "_encode_fn", lambda: encode)
    tma.encode.cache_clear()
    write = params.TmaSlot("q", "bfloat16", (1, 2, 128, 64), (16384, 8192, 64, 1), 64).writer()
    buf = bytearray(8 + tma.MAP_BYTES)
    for address in (0x10000, 0x20000, 0x10000):
        write(buf, 8, address)
        assert buf[8:] == address.to_bytes(8, "little") * 16 and buf[:8] == bytes(8)
    assert encoded == [0x10000, 0x20000]


@pytest.mark.parametrize("values,error", [
    (dict(dq_accum=0, dq=0, dq_s=(0, 0, 0), H=1, Nq=1, n_rows=1), r"fields missing \['scale'\]"),
    (dict(dq_accum=0, dq=0, dq_s=(0, 0, 0), H=1, Nq=1, n_rows=1, scale=1.0, extra=1), r"unknown \['extra'\]"),
    (dict(dq_accum=0, dq=0, dq_s=(0, 0), H=1, Nq=1, n_rows=1, scale=1.0), "2 values for 3 fields"),
    (dict(dq_accum=0, dq=0, dq_s=(0, 0, 0), H=1 << 31, Nq=1, n_rows=1, scale=1.0), r"\.H = 2147483648 does not fit"),
])
def test_pack_refuses_what_does_not_fit_the_layout(values, error):
    with pytest.raises(ValueError, match=error):
        params.CONVERT_DQ.pack(values)
