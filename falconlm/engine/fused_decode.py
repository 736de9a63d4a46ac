"""Every layer of a Falcon or Falcon3 decode step in one native call (``falconlm.native``'s ``falcon_decode_layers``).

At batch 1 a token through torch is about fifty small matmuls and several hundred small ops, and their dispatch
and thread wake-ups cost about as much time as reading the weights. :class:`FusedDecoder` runs all the layers in
one OpenMP parallel region instead, as llama.cpp runs its whole graph in C. The runner chooses, step by step,
between it and the model's torch forward; this module only binds a model's tensors to the native structs.

It applies to steps that add one token per row to a paged KV cache (``PagedAttention.decode_rows``) of every Falcon
layout (Falcon-7B, 40B, 180B, Falcon2-11B; falcon-rw's sequential block with its biases and ALiBi, whose bias the
rows carry) and of bias-free Falcon3 models (the Llama layout: RMSNorm, attention then a SwiGLU MLP) on the CPU
whose layer matrices are all bfloat16, or all int8 / int4 on the native quantized kernel, and their greedy decode
runs (``falcon_decode_run``); the prompt chunks of Falcon3 and falcon-rw keep the torch path. Everything else, and
every step when ``FALCONLM_FUSED_DECODE`` is 0, keeps the torch path. The residual stream stays in float32 inside
the call, so results equal the torch path's up to rounding (in bfloat16, the torch path rounds the residual after
every op and the fused one does not).

Prompt chunks run here too, a row per token (``PagedAttention.token_rows``, ``falcon_prompt_layers``): those of
bfloat16 models where the torch path's prompt GEMM would be the native panel GEMM (``ops.prompt_panels``: AVX2
without bfloat16 arithmetic), multiplied through the same widened weight panels, and those of int8 / int4 models
wherever the torch path would multiply them by the same int8 dot products (no AMX). The call spares the chunk the
torch forward's dispatch, its element-wise ops and SDPA. Each token row is summed alone, so a prompt's scores
no longer depend on how the scheduler cut it into chunks (the runner sends a chunk of one token here too, not
as a decode row). Only the rows whose logits are read (a chunk's last token, or none, unless the prompt is scored)
go through the last layer past their K/V, as llama.cpp skips the tokens it outputs nothing for.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .. import native
from ..model.dense import KVCache, build_dense_attention
from ..model.falcon3_config import Falcon3Config
from ..model.paged_attention import alibi_table
from ..model.positions import head_alibi_slopes, is_dynamic, rope_cos_sin
from ..native import ops
from ..native.decode import Layer, Rows, Run, Shape, Weight, check_layout
from ..quant.kernels.native import ACTIVATION_BLOCK, NativeKernel
from ..quant.linear import QuantizedLinear
from .decode_run import run_parts, stop_tokens

if TYPE_CHECKING:
    from ..model.attention import DecodeRows
    from ..model.causal_lm import CausalLM
    from ..model.config import FalconConfig
    from ..model.falcon import FalconForCausalLM
    from .request import Request

MAX_HEAD_DIM = 256
CACHE_DTYPES = (torch.bfloat16, torch.float32)
# Rows per native call. A step with more (deterministic mode sends prompt chunks through the step, up to the token
# budget: 2048 rows or more for long contexts) runs in parts of this many, one after the other, so the step's
# scratch, which grows to its largest call (about 230 KB a row for a Falcon-7B shape), stays near 115 MB. A row's
# bits do not change: the kernels sum each row alone, and a later part reads the K/V that an earlier one stored.
MAX_CALL_ROWS = 512
# Positions in a first rotary table (FusedDecoder.rotary); it doubles as longer contexts need.
ROTARY_TABLE_POSITIONS = 512


def enabled() -> bool:
    """False when ``FALCONLM_FUSED_DECODE`` is 0 / false / off."""
    return native.switch(os.environ.get("FALCONLM_FUSED_DECODE", "1"))


def config_unsupported(c: FalconConfig | Falcon3Config) -> str | None:
    """Why a Falcon or Falcon3 config's layers can never run fused (whatever their weights), or None when they may."""
    if isinstance(c, Falcon3Config) and (c.attention_bias or c.mlp_bias):
        return "only bias-free Falcon3 layers run fused"
    if c.head_dim % ACTIVATION_BLOCK or c.head_dim > MAX_HEAD_DIM or c.hidden_size % 16:
        return f"head_dim {c.head_dim} / hidden {c.hidden_size} do not fit the kernel's blocks"
    return None


def unsupported(model: torch.nn.Module) -> str | None:
    """Why the decoder ``model``'s decode steps cannot run fused, or None when they can."""
    c = model.config
    if (why := config_unsupported(c)) is not None:
        return why
    layout = _layout(model)
    shapes = layout.shapes(c)
    first = None
    for block in layout.blocks(model):
        matrices = layout.matrices(block)
        kinds = {name: _kind(m) for name, m in matrices.items()}
        if None in kinds.values():
            return "every layer matrix must be bfloat16 on the CPU, or quantized on the native kernel, without bias"
        sharded = any(hasattr(m, "tp_shards") for m in matrices.values())  # falconlm.parallel's layers
        if sharded or any(matrices[name].out_features != n for name, n in shapes.items()):
            return "the layer matrices are sharded (tensor parallel)"
        if first is not None and kinds != first:
            return "the layers' matrices differ in format"
        first = kinds
        if getattr(block, layout.norm_names(block)[0]).weight.device.type != "cpu":
            return "the model is not on the CPU"
    if (why := native.unavailable_reason()) is not None:
        return f"native kernels unavailable: {why}"
    return None


# Where each matrix of a block lives, by its name in the native Layer struct.
MATRIX_PATHS = {
    "qkv": "self_attention.query_key_value",
    "dense": "self_attention.dense",
    "up": "mlp.dense_h_to_4h",
    "down": "mlp.dense_4h_to_h",
}
LLAMA_MATRIX_PATHS = {  # Falcon3: q_proj takes the Layer's qkv, up_proj its up
    "qkv": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "dense": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass(frozen=True)
class _Layout:
    """Where a decoder keeps what the native Layer structs point to: its blocks, their matrices and norms, and
    its final norm; ``llama``: the Llama block (RMSNorm, attention then a SwiGLU MLP) rather than Falcon's."""

    blocks_name: str
    final_norm_name: str
    paths: dict[str, str]
    llama: bool

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return getattr(model, self.blocks_name)

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, self.final_norm_name)

    def matrices(self, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return {name: block.get_submodule(path) for name, path in self.paths.items()}

    def norm_names(self, block: torch.nn.Module) -> tuple[str, ...]:
        """The block's norms: Falcon's LayerNorm per branch (40B / 180B / 11B) or one for both (7B); Llama's two
        RMSNorms (before the attention, before the MLP)."""
        if self.llama or hasattr(block, "post_attention_layernorm"):  # (falcon-rw's sequential block too)
            return ("input_layernorm", "post_attention_layernorm")
        return ("ln_attn", "ln_mlp") if hasattr(block, "ln_attn") else ("input_layernorm",)

    def shapes(self, c: FalconConfig | Falcon3Config) -> dict[str, int]:
        """Each matrix's output features."""
        if self.llama:
            q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            f = c.intermediate_size
            return {"qkv": q, "k": kv, "v": kv, "dense": c.hidden_size, "gate": f, "up": f, "down": c.hidden_size}
        return {"qkv": c.qkv_out_features, "dense": c.hidden_size, "up": c.ffn_hidden_size, "down": c.hidden_size}


FALCON_LAYOUT = _Layout("h", "ln_f", MATRIX_PATHS, llama=False)
LLAMA_LAYOUT = _Layout("layers", "norm", LLAMA_MATRIX_PATHS, llama=True)


def _layout(model: torch.nn.Module) -> _Layout:
    """The layout of decoder ``model`` (a FalconModel or a Falcon3Model)."""
    return LLAMA_LAYOUT if isinstance(model.config, Falcon3Config) else FALCON_LAYOUT


def _norm_parameters(norm: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """A LayerNorm's weight and bias, an RMSNorm's weight."""
    return (norm.weight, norm.bias) if isinstance(norm, torch.nn.LayerNorm) else (norm.weight,)


def _kind(m: torch.nn.Module) -> tuple[int, int, int] | None:
    """(bits, padded width, group size) of a matrix the kernel can read, else None: int8 / int4 on the native
    kernel, or a bfloat16 weight (bits 16) whose shape fits the kernel's blocks. A bias is bound on its own."""
    if isinstance(m, QuantizedLinear):
        s = m.spec
        return (s.bits, s.padded_in, s.group_size) if isinstance(m.kernel, NativeKernel) else None
    w = getattr(m, "weight", None)
    if not isinstance(m, torch.nn.Linear) or w.dtype is not torch.bfloat16 or w.device.type != "cpu":
        return None
    if not w.is_contiguous() or w.shape[1] % ACTIVATION_BLOCK or w.shape[0] % 16:
        return None
    return (16, w.shape[1], 0)


def _weight(m: torch.nn.Module) -> Weight:
    bits, padded, group = _kind(m)
    if bits == 16:
        return Weight(m.weight.data_ptr(), None, m.out_features, padded, m.in_features, 0, 16)
    return Weight(m.qweight.data_ptr(), m.scales.data_ptr(), m.out_features, padded, m.in_features, group, bits)


def _tensor_names(m: torch.nn.Module) -> tuple[str, ...]:
    names = ("weight",) if isinstance(m, torch.nn.Linear) else ("qweight", "scales")
    return names if getattr(m, "bias", None) is None else (*names, "bias")


def _norm_tensor_names(norm: torch.nn.Module) -> tuple[str, ...]:
    return ("weight", "bias") if isinstance(norm, torch.nn.LayerNorm) else ("weight",)


def _holder(module: torch.nn.Module, name: str) -> dict:
    """The dictionary that holds ``module``'s attribute ``name``: its parameters, buffers, or plain attributes."""
    for d in (module._parameters, module._buffers, module.__dict__):
        if name in d:
            return d
    raise AttributeError(name)


class _Binding:
    """The objects a binding was made from, checked cheaply on every step: each dictionary entry on the way from
    the model to a tensor the native call reads (a replaced module or tensor changes one) and each tensor's data
    pointer (``param.data = ...``, as ``Module.to`` does, changes that). Holding them also keeps the memory the
    native pointers refer to alive until the next rebind."""

    def __init__(self, model: torch.nn.Module) -> None:
        layout = _layout(model)
        blocks = layout.blocks(model)
        self.links: list[tuple[dict, str, object]] = [(model._modules, layout.blocks_name, blocks)]
        self.tensors: list[torch.Tensor] = []
        for i, block in enumerate(blocks):
            self.links.append((blocks._modules, str(i), block))
            norms = layout.norm_names(block)
            for path in [*layout.paths.values(), *norms]:
                module = block
                for part in path.split("."):
                    child = module._modules[part]
                    self.links.append((module._modules, part, child))
                    module = child
                names = _norm_tensor_names(module) if path in norms else _tensor_names(module)
                for name in names:
                    tensor = getattr(module, name)
                    self.links.append((_holder(module, name), name, tensor))
                    self.tensors.append(tensor)
        final = layout.final_norm(model)
        self.links.append((model._modules, layout.final_norm_name, final))
        for name in _norm_tensor_names(final):
            tensor = getattr(final, name)
            self.links.append((_holder(final, name), name, tensor))
            self.tensors.append(tensor)
        self.pointers = [t.data_ptr() for t in self.tensors]

    def current(self) -> bool:
        """True while every link holds the same object and every tensor's data is where it was."""
        return all(d.get(k) is v for d, k, v in self.links) and all(
            t.data_ptr() == p for t, p in zip(self.tensors, self.pointers, strict=True)
        )


class FusedDecoder:
    """Runs one model's layers for decode steps natively (made by :func:`fused_decoder`).

    It holds pointers into the model's tensors, so every call first checks that they have not moved (a ``.to()``
    or a reload) and rebinds when they have. It refers to the model weakly: the model owns nothing of it, so a
    copied or pickled model simply gets a decoder of its own on its first step.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = weakref.ref(model)
        self._layout = _layout(model)
        self._kv_group_per_head = model.config.num_kv_groups == model.config.num_attention_heads > 1  # (falcon-rw)
        lib = native.kernels()
        check_layout(lib)
        self._fn = lib.falcon_decode_layers
        self._prompt_fn = lib.falcon_prompt_layers
        self._final_norm_fn = lib.falcon_final_norm
        self._run_fn = lib.falcon_decode_run
        self._bind(model)
        self.usable = True  # the binding is current and the model supported (fused_decoder checked it)
        self._rotary: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> float32 cos, sin tables

    def _bind(self, model: torch.nn.Module) -> None:
        c, layout = model.config, self._layout
        self._keep: list[torch.Tensor] = []  # float32 norm parameters and biases, alive as long as we are
        self._norm_copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its float32 copy)
        layers = (Layer * c.num_hidden_layers)()
        for i, block in enumerate(layout.blocks(model)):
            layer = layers[i]
            for name, m in layout.matrices(block).items():
                setattr(layer, name, _weight(m))
                if m.bias is not None:  # Falcon's (falcon-rw); Falcon3's biased layers keep the torch path
                    setattr(layer, f"{name}_b", self._float32_copy(m.bias).data_ptr())
            norms = []  # (weight, bias or None) of each norm
            for norm in (getattr(block, name) for name in layout.norm_names(block)):
                pointers = [self._float32_copy(p).data_ptr() for p in _norm_parameters(norm)]
                norms.append((pointers[0], pointers[1] if len(pointers) == 2 else None))
            layer.ln_attn_w, layer.ln_attn_b = norms[0]
            layer.ln_mlp_w, layer.ln_mlp_b = norms[1] if len(norms) == 2 else (None, None)
        self._layers = layers
        final = layout.final_norm(model)
        weight, *bias = (self._float32_copy(p) for p in _norm_parameters(final))
        self._final_norm = (weight, bias[0] if bias else None)  # (Falcon3's RMSNorm has no bias)
        self._binding = _Binding(model)
        self.bf16_weights = all(
            _kind(m)[0] == 16 for block in layout.blocks(model) for m in layout.matrices(block).values()
        )

    def _float32_copy(self, p: torch.Tensor) -> torch.Tensor:
        """A norm's parameter or a bias in float32, kept alive with the binding (``p`` itself where it is
        float32)."""
        p32 = p.detach().to(torch.float32).contiguous()
        self._keep.append(p32)
        if p32.data_ptr() != p.data_ptr():
            self._norm_copies.append((p, p32))
        return p32

    def takes_prompts(self) -> bool:
        """Whether prompt chunks run fused too, a row per token (``falcon_prompt_layers``): bfloat16 weights where
        the panel GEMM is what the torch path would use for a prompt's many rows (``ops.prompt_panels``), their
        matmuls then through the same weight panels; int8 / int4 weights where the torch path's prompt batches
        would take the same int8 dot products, that is wherever no AMX bfloat16 GEMM takes them
        (``ops.bf16_matrix_hardware``). The fused call spares the chunk the torch forward's dispatch, its
        element-wise ops and attention, and the last layer of the rows whose logits nobody reads. Falcon3's prompts
        keep the torch forward, and so do falcon-rw's: with a KV group per head, its rows' attention over a 512-token
        chunk cost more than the torch forward's SDPA (int4 prefill 1150 -> 660 tok/s)."""
        if self._layout.llama or self._kv_group_per_head:
            return False
        return ops.prompt_panels() if self.bf16_weights else not ops.bf16_matrix_hardware()

    def refresh(self) -> bool:
        """Rebind if the model's tensors have moved since the last binding; False when the model is gone or can no
        longer run fused. The answer stays in :attr:`usable` until the next refresh. Checking every link and pointer
        costs about 0.2 ms on bench-1b after a step has streamed the weights through the caches (2% of a batch-1
        step), so the engine refreshes only when a run of steps starts (``SchedulerOutput.continued``) and reads
        ``usable`` on the run's later steps: while it has requests running it owns the model."""
        model = self._model()
        if model is None:
            self.usable = False
        elif self._binding.current() and self._norm_copies_current():
            self.usable = True
        else:
            self.usable = unsupported(model) is None
            if self.usable:
                self._bind(model)
        return self.usable

    def _norm_copies_current(self) -> bool:
        """Whether the float32 copies of a non-float32 model's LayerNorm parameters still hold their values: an
        in-place change (``load_state_dict``, ``.data.mul_()``) moves no pointer."""
        return all(torch.equal(p.detach().to(torch.float32), p32) for p, p32 in self._norm_copies)

    def rotary(
        self, config: FalconConfig, positions: torch.Tensor, dtype: torch.dtype, rope_lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos / sin of ``positions`` [B, T] as this call takes them: float32 [B * T, head_dim], the
        values of ``rope_cos_sin`` in ``dtype`` (the torch path's), widened. Rows of a table per dtype that
        ``rope_cos_sin`` itself made over every position up to its end, so bit-equal to it (a test compares each
        row): one gather a step instead of its five ops and two copies, each tens of microseconds right after a
        step has streamed the weights through the caches. Dynamic scaling's frequencies depend on the sequence
        length: those are computed each step."""
        flat = positions.reshape(-1)
        if is_dynamic(config):
            cos, sin = rope_cos_sin(config, positions, dtype, rope_lengths)
            return cos.reshape(-1, config.head_dim).float(), sin.reshape(-1, config.head_dim).float()
        tables = self._rotary.get(dtype)
        if tables is not None:
            try:
                return tables[0].index_select(0, flat), tables[1].index_select(0, flat)
            except IndexError:  # a position past the table's end
                pass
        n = tables[0].shape[0] if tables is not None else ROTARY_TABLE_POSITIONS
        last = int(flat.max()) if flat.numel() else 0
        while n <= last:
            n *= 2
        cos, sin = rope_cos_sin(config, torch.arange(n, device=flat.device)[None], dtype)
        tables = self._rotary[dtype] = (cos.reshape(n, -1).float(), sin.reshape(n, -1).float())
        return tables[0].index_select(0, flat), tables[1].index_select(0, flat)

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        rows: DecodeRows,
        prompt: bool = False,
        check: bool = True,
        out_rows: Sequence[int] | None = None,
    ) -> torch.Tensor | None:
        """The hidden states after every layer and the final LayerNorm (:meth:`final_norm`), in ``x``'s dtype, for
        ``x`` [B, T, H] (one new token per row: B * T rows) and the rows' rotary ``cos`` / ``sin`` ([B, T, 1, 1,
        head_dim], or as :meth:`rotary` gives them; None for ALiBi models, whose ``rows`` carry the bias); None when
        this step cannot run fused. ``prompt``: the rows are prompt tokens (``PagedAttention.token_rows``), run as
        :meth:`takes_prompts` says. ``out_rows`` (flat row indices; None: all) names the rows whose states are read:
        every row stores its K/V, and the others' states are left as they were before the last layer. ``check``
        False: the caller has :meth:`refresh`-ed since the model last changed."""
        model = self._model()
        if model is None or rows.k.dtype not in CACHE_DTYPES or not rows.k.is_cpu:
            return None
        tables, lengths = rows.block_tables, rows.context_lens
        if x.numel() != lengths.numel() * model.config.hidden_size or tables.shape[0] != lengths.numel():
            raise ValueError(f"a decode step of {lengths.numel()} rows got hidden states {list(x.shape)}")
        if getattr(model.config, "alibi", False) != (rows.alibi is not None):
            return None  # an ALiBi model's rows carry its bias (and only those)
        if check and not self.refresh():
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self._binding.tensors)):
            return None  # gradients go through the torch path
        c = model.config
        shape = _shape(c, rows)
        residual = x.reshape(-1, c.hidden_size).to(torch.float32, copy=True)
        if cos is None:  # ALiBi: no rotary (the bias comes with the rows)
            cos32 = sin32 = torch.zeros(residual.shape[0], 0)
        else:
            cos32 = cos.reshape(-1, c.head_dim).to(torch.float32).contiguous()
            sin32 = sin.reshape(-1, c.head_dim).to(torch.float32).contiguous()
        every_row = out_rows is None or len(out_rows) == residual.shape[0]  # (the rows read are distinct)
        for start in range(0, residual.shape[0], MAX_CALL_ROWS):
            part = slice(start, start + MAX_CALL_ROWS)
            table_rows, part_lengths = tables[part], lengths[part]
            where = _rows(rows, table_rows, part_lengths)
            args = (
                ctypes.addressof(shape), ctypes.addressof(self._layers), ctypes.addressof(where),
                residual[part].data_ptr(), residual[part].shape[0], cos32[part].data_ptr(), sin32[part].data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
            kept = None if every_row else _part_rows(out_rows, start, residual[part].shape[0])
            (self._prompt_fn if prompt else self._fn)(
                *args, None if kept is None else kept.data_ptr(), -1 if kept is None else kept.numel()
            )
        if x.dtype not in CACHE_DTYPES:
            return self._layout.final_norm(model)(residual.view(x.shape).to(x.dtype))
        return self.final_norm(residual, x.dtype).view(x.shape)

    def runs(self, model: CausalLM, cache: torch.Tensor, rows: int) -> bool:
        """Whether :meth:`run` can take ``rows`` decode rows of ``model`` over a KV cache of ``cache``'s dtype and
        device: this decoder is bound to the model and up to date, the library reads its embedding and head
        (``decode_run.run_parts``), the cache is a CPU bfloat16 / float32 one and the rows fit one call."""
        return _run_cache(cache, rows) and self._run_parts(model) is not None

    def _run_parts(self, model: CausalLM) -> tuple[Weight, Weight, torch.dtype] | None:
        """``run_parts(model)`` where this decoder is bound to ``model``, up to date and its rotary static; else
        None."""
        if model.decoder is not self._model() or not self.usable:
            return None
        if is_dynamic(model.config):
            return None
        return run_parts(model)

    def run(
        self, model: FalconForCausalLM, rows: DecodeRows, tokens: Sequence[int], steps: int, requests: Sequence[Request]
    ) -> list[list[int]] | None:
        """Up to ``steps`` greedy decode steps of a decode step's ``rows``, each row's input ``tokens[r]``, in one
        native call (``falcon_decode_run``, see ``decode_run.py``): each step's tokens, [steps run][R], the run
        ending after a step where a row chose a stop token of its request. None where the model's embedding or
        head is not one the library reads; the caller then runs the steps in Python. Every row must have cache
        slots for every position the run reaches; the caller has :meth:`refresh`-ed."""
        lengths = rows.context_lens
        parts = self._run_parts(model)
        if parts is None or not _run_cache(rows.k, lengths.numel()):
            return None
        c = model.config
        embed, head, dtype = parts
        last = int(lengths.max()) + steps - 2  # the last position a step reaches
        if getattr(c, "alibi", False):  # the bias table up to that position, in place of the step's
            rows = replace(rows, alibi=alibi_table(head_alibi_slopes(c), last + 1, rows.k.dtype, c.head_dim))
            cos = sin = None
            table_rows = last + 1
        else:
            self.rotary(c, torch.tensor([[last]]), dtype, None)  # the table grows to hold it
            cos, sin = self._rotary[dtype]
            table_rows = cos.shape[0]
        shape, tables = _shape(c, rows), rows.block_tables
        where = _rows(rows, tables, lengths)
        stops = stop_tokens(requests)
        w, b = self._final_norm
        eps = self._layout.final_norm(self._model()).eps
        run = Run(embed, head, w.data_ptr(), _pointer(b), eps, _pointer(cos), _pointer(sin), table_rows,
                  stops.data_ptr(), stops.shape[1], int(dtype is torch.bfloat16))  # fmt: skip
        out = torch.empty(steps + 1, lengths.numel(), dtype=torch.int64)
        out[0] = torch.tensor(tokens, dtype=torch.int64)
        ran = self._run_fn(
            ctypes.addressof(shape), ctypes.addressof(self._layers), ctypes.addressof(where), ctypes.addressof(run),
            lengths.numel(), steps, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out[1 : ran + 1].tolist() if ran else None  # (none: a table too short, which rotary() prevents)

    def final_norm(self, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The final norm (Falcon's ``ln_f``, Falcon3's RMSNorm) of float32 residual rows [N, H], natively, in
        ``dtype`` (bfloat16 or float32): what every fused step hands the output head, alone or in a decode run
        (``falcon_decode_run``). The torch path's would take the residual rounded to ``dtype`` first."""
        eps = self._layout.final_norm(self._model()).eps
        n, h = residual.shape
        y = torch.empty(n, h, dtype=dtype)
        w, b = self._final_norm
        self._final_norm_fn(
            residual.data_ptr(), n, h, w.data_ptr(), _pointer(b), eps, y.data_ptr(), int(dtype is torch.bfloat16)
        )
        return y


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run_cache(cache: torch.Tensor, rows: int) -> bool:
    """Whether a decode run (``falcon_decode_run``) takes ``rows`` rows over a KV cache like ``cache``."""
    return cache.dtype in CACHE_DTYPES and cache.is_cpu and rows <= MAX_CALL_ROWS


def _part_rows(out_rows: Sequence[int], start: int, count: int) -> torch.Tensor:
    """The rows of ``out_rows`` among flat rows ``start`` .. ``start + count - 1``, as indices from ``start``, in
    order, each once."""
    return torch.tensor(sorted({r - start for r in out_rows if start <= r < start + count}), dtype=torch.int64)


def _rows(rows: DecodeRows, tables: torch.Tensor, lengths: torch.Tensor) -> Rows:
    """The native Rows of ``rows``' cache for the rows whose block tables and context lengths are ``tables`` /
    ``lengths`` (all of ``rows``' or a slice of them)."""
    alibi = rows.alibi
    return Rows(rows.k.data_ptr(), rows.v.data_ptr(), rows.layer_stride, rows.sb, rows.sp, rows.sg, rows.block_size,
                tables.data_ptr(), tables.stride(0), lengths.data_ptr(), None if alibi is None else alibi.data_ptr(),
                0 if alibi is None else alibi.stride(0))  # fmt: skip


def _shape(c: FalconConfig | Falcon3Config, rows: DecodeRows) -> Shape:
    """The native Shape of ``c``'s layers over ``rows``' cache."""
    llama = isinstance(c, Falcon3Config)
    eps = c.rms_norm_eps if llama else c.layer_norm_epsilon
    sequential = not llama and not c.parallel_attn
    return Shape(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_kv_groups, c.head_dim,
                 eps, int(rows.k.dtype is torch.bfloat16), int(llama), int(sequential))  # fmt: skip


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> (switches, FusedDecoder or None)


def fused_decoder(model: torch.nn.Module) -> FusedDecoder | None:
    """``model``'s decoder when its decode steps can run fused and ``FALCONLM_FUSED_DECODE`` is not off; the
    answer is kept per model while the switches that decide it stay the same."""
    if not enabled() or model.training or not native.enabled():
        return None
    switches = native.chosen_variant()
    known = _DECODERS.get(model)
    if known is None or known[0] != switches:
        known = _DECODERS[model] = (switches, FusedDecoder(model) if unsupported(model) is None else None)
    return known[1]


def fused_hidden(
    model: CausalLM,
    decoder: FusedDecoder,
    ids: torch.Tensor,
    positions: torch.Tensor,
    rows: DecodeRows,
    rope_lengths: torch.Tensor | None = None,
    prompt: bool = False,
    check: bool = True,
    out_rows: Sequence[int] | None = None,
) -> torch.Tensor | None:
    """Hidden states after ``ln_f`` of a decode step of token ``ids`` at ``positions`` (both [B, T], one new token
    per row) through ``decoder``, whose K/V go where ``rows`` says; None when the step cannot run fused.
    ``rope_lengths`` as for the model's forward (dynamic RoPE scaling); ``prompt``, ``check`` and ``out_rows`` as
    for :class:`FusedDecoder`."""
    x = model.get_input_embeddings()(ids)
    if rows.alibi is not None:
        return decoder(x, None, None, rows, prompt, check, out_rows)
    cos, sin = decoder.rotary(model.config, positions, x.dtype, rope_lengths)
    return decoder(x, cos, sin, rows, prompt, check, out_rows)


def dense_step(model: CausalLM, ids: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
    """One fused decode step over a dense :class:`KVCache` (tests and benchmarks; the engine's runner does the
    same over its paged cache): logits [B, vocab] of ``ids`` [B, 1] at position ``cache.length``, or None when the
    model cannot decode fused (nothing is written then)."""
    decoder = fused_decoder(model.decoder)
    if decoder is None:
        return None
    batch = ids.shape[0]
    dtype = model.dtype  # the activations' (cheap on quantized models)
    ctx = build_dense_attention(model.config, 1, None, cache, dtype, ids.device, batch, 0.0)
    positions = torch.full((batch, 1), cache.length, device=ids.device)
    hidden = fused_hidden(model, decoder, ids, positions, ctx.decode_rows())
    if hidden is None:
        return None
    cache.length += 1
    return model.compute_logits(hidden)[:, -1]
