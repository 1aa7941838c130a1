"""A Plan as llama.cpp parameters: a pure description, turned into ctypes by the backend.

Nothing here imports llama.cpp. `placement_for(plan)` gives a `LlamaPlacement`, which offers the values three
ways: `backend_config_kwargs()` with the field names of bindings.llama_backend.LlamaBackendConfig,
and `model_params()` / `context_params()` with the field names and integer enum values of llama.cpp's
`llama_model_params` / `llama_context_params` (llama.h), for code that fills the structs itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from offload.gguf_shape import KvType
from offload.planner import Plan

# llama.h enums
LLAMA_LOAD_MODE_NONE = 0
LLAMA_LOAD_MODE_MMAP = 1
LLAMA_LOAD_MODE_MLOCK = 2
LLAMA_LOAD_MODE_MMAP_MLOCK = 3
LLAMA_SPLIT_MODE_LAYER = 1
LLAMA_FLASH_ATTN_TYPE = {"auto": -1, "off": 0, "on": 1}


@dataclass(frozen=True)
class LlamaPlacement:
    """Everything llama.cpp must be told to realise a plan."""

    n_gpu_layers: int  # the last n layers on the GPUs, the output layer counting as one
    tensor_split: tuple[float, ...]  # layers per GPU (proportions); empty for zero or one GPU
    tensor_overrides: tuple[tuple[str, str], ...]  # (regex on tensor names, device), first match wins, like -ot
    n_ctx_per_slot: int  # what the plan asked for; llama.cpp pads n_ctx and each slot's share to 256
    n_seq_max: int
    n_batch: int
    n_ubatch: int
    n_outputs_max: int  # 0: llama.cpp's default (n_batch), which the compute prediction assumes
    type_k: KvType
    type_v: KvType
    flash_attn: str  # "auto" or "on" ("on" whenever the KV cache is quantized: llama.cpp requires it)
    n_threads: int
    n_threads_batch: int
    use_mmap: bool
    use_mlock: bool
    use_extra_bufts: bool
    offload_kqv: bool = True  # KV cache on the device of its layer, as the plan counts it
    op_offload: bool = True  # prompt batches use RAM-resident experts on the GPU, as the plan assumes
    kv_unified: bool = False  # one stream per slot (measured faster here; also what the plan sizes)

    @property
    def n_ctx(self) -> int:
        return self.n_ctx_per_slot * self.n_seq_max

    @property
    def load_mode(self) -> int:
        if self.use_mmap:
            return LLAMA_LOAD_MODE_MMAP_MLOCK if self.use_mlock else LLAMA_LOAD_MODE_MMAP
        return LLAMA_LOAD_MODE_MLOCK if self.use_mlock else LLAMA_LOAD_MODE_NONE

    def backend_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for LlamaBackendConfig (its field names). tensor_split and n_outputs_max are
        left out: that config has no such fields (a single-GPU plan needs neither)."""
        return {
            "n_slots": self.n_seq_max,
            "n_ctx_per_slot": self.n_ctx_per_slot,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads_batch,
            "use_extra_bufts": self.use_extra_bufts,
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_overrides": self.tensor_overrides,
            "type_k": self.type_k.value,
            "type_v": self.type_v.value,
            "flash_attn": self.flash_attn,
            "use_mmap": self.use_mmap,
            "use_mlock": self.use_mlock,
            "kv_unified": self.kv_unified,
            "offload_kqv": self.offload_kqv,
            "op_offload": self.op_offload,
        }

    def model_params(self) -> dict[str, Any]:
        """llama_model_params fields (tensor_buft_overrides as (pattern, device name) pairs to resolve)."""
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "split_mode": LLAMA_SPLIT_MODE_LAYER,
            "load_mode": self.load_mode,
            "tensor_split": self.tensor_split,
            "tensor_buft_overrides": self.tensor_overrides,
            "use_extra_bufts": self.use_extra_bufts,
        }

    def context_params(self) -> dict[str, Any]:
        """llama_context_params fields, enums as llama.h integers."""
        return {
            "n_ctx": self.n_ctx,
            "n_seq_max": self.n_seq_max,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "n_outputs_max": self.n_outputs_max,
            "type_k": int(self.type_k.ggml_type),
            "type_v": int(self.type_v.ggml_type),
            "flash_attn_type": LLAMA_FLASH_ATTN_TYPE[self.flash_attn],
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads_batch,
            "offload_kqv": self.offload_kqv,
            "op_offload": self.op_offload,
            "kv_unified": self.kv_unified,
        }


def placement_for(plan: Plan) -> LlamaPlacement:
    """The llama.cpp parameters that realise `plan`."""
    return LlamaPlacement(
        n_gpu_layers=plan.n_gpu_layers,
        tensor_split=plan.tensor_split,
        tensor_overrides=plan.tensor_overrides,
        n_ctx_per_slot=plan.ctx,
        n_seq_max=plan.parallel,
        n_batch=plan.n_batch,
        n_ubatch=plan.n_ubatch,
        n_outputs_max=0,
        type_k=plan.kv_type,
        type_v=plan.kv_type,
        flash_attn=plan.flash_attn,
        n_threads=plan.threads,
        n_threads_batch=plan.threads_batch,
        use_mmap=plan.use_mmap,
        use_mlock=plan.use_mlock,
        use_extra_bufts=plan.use_extra_bufts,
        op_offload=plan.op_offload,
    )
