"""The fused decode step's interface: ctypes mirrors of ``decode.cpp``'s structs and the raw call.

``falcon_decode_layers`` runs every layer of a Falcon or Falcon3 decode step (one new token per row) in one OpenMP
region; see ``csrc/decode.cpp``. This module knows buffers and shapes only; ``falconlm.engine.fused_decode`` fills the
structs from a model.
"""

from __future__ import annotations

import ctypes

_P, _I = ctypes.c_void_p, ctypes.c_int64


class Weight(ctypes.Structure):
    """One layer matrix: bits 8 / 4, tiled (quant_tiles.h), k padded; bits 16, bfloat16 [n][k] row-major."""

    _fields_ = [("w", _P), ("scales", _P), ("n", _I), ("k", _I), ("k_real", _I), ("group", _I), ("bits", _I)]


class Layer(ctypes.Structure):
    """A block's matrices and its norms' parameters (float32; ``ln_mlp_*`` null with one LayerNorm, the biases null
    for RMSNorm). Falcon: ``qkv`` the fused projection, ``k`` / ``v`` / ``gate`` unread; the Llama layout: ``qkv``
    q_proj, ``up`` up_proj, and ``k``, ``v``, ``gate`` k_proj, v_proj, gate_proj. ``*_b``: Falcon's matmul biases
    (float32; null without)."""

    _fields_ = [
        *((name, Weight) for name in ("qkv", "dense", "up", "down")),
        *((name, _P) for name in ("ln_attn_w", "ln_attn_b", "ln_mlp_w", "ln_mlp_b")),
        *((name, Weight) for name in ("k", "v", "gate")),
        *((name, _P) for name in ("qkv_b", "dense_b", "up_b", "down_b")),
    ]


class Shape(ctypes.Structure):
    """The model's shape, the KV cache's dtype (``kv_bf16`` 1 for bfloat16, 0 for float32) and the block's layout
    (``llama`` 1: RMSNorm, attention then a SwiGLU MLP, each added to the residual; 0: Falcon's, whose
    ``sequential`` 1 is falcon-rw's block: LayerNorm, attention, added; LayerNorm, MLP, added)."""

    _fields_ = [
        *((name, _I) for name in ("layers", "hidden", "heads", "groups", "head_dim")),
        ("eps", ctypes.c_double),
        ("kv_bf16", _I),
        ("llama", _I),
        ("sequential", _I),
    ]


class Rows(ctypes.Structure):
    """Where each row's K/V live (element strides of the cache), the rows' lengths after this step, and for ALiBi
    models the score bias (float32 [positions][alibi_ld] by key position and query head; null for rotary ones)."""

    _fields_ = [
        ("k", _P),
        ("v", _P),
        *((name, _I) for name in ("layer_stride", "sb", "sp", "sg", "block_size")),
        ("block_tables", _P),
        ("tb", _I),
        ("context_lens", _P),
        ("alibi", _P),
        ("alibi_ld", _I),
    ]


class Run(ctypes.Structure):
    """A decode run's embedding, final LayerNorm, head, rotary tables and stop tokens (``falcon_decode_run``):
    ``embed`` bits 16 / 32 a bfloat16 / float32 table, 8 / 4 a tied head's tiles; ``head`` as a layer matrix."""

    _fields_ = [
        ("embed", Weight),
        ("head", Weight),
        *((name, _P) for name in ("norm_w", "norm_b")),
        ("norm_eps", ctypes.c_double),
        *((name, _P) for name in ("cos", "sin")),
        ("table_rows", _I),
        ("stops", _P),
        ("stops_per_row", _I),
        ("act_bf16", _I),
    ]


STRUCTS = (Weight, Layer, Shape, Rows, Run)


def python_layout() -> list[int]:
    """[sizeof, offset of each field] of every mirrored struct, in the order ``falcon_struct_layout`` writes."""
    out: list[int] = []
    for struct in STRUCTS:
        out += [ctypes.sizeof(struct), *(getattr(struct, name).offset for name, _ in struct._fields_)]
    return out


def check_layout(lib: ctypes.CDLL) -> None:
    """Raise RuntimeError when the library's structs and the mirrors above disagree (a stale or foreign build)."""
    expected = python_layout()
    buffer = (ctypes.c_int64 * (len(expected) + 16))()
    written = lib.falcon_struct_layout(buffer)
    native = list(buffer[:written])
    if native != expected:
        raise RuntimeError(f"native decode structs do not match their ctypes mirrors: {native} != {expected}")
