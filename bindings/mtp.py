"""Qwen3-Next's multi-token-prediction (MTP) head as a drafter for speculative decoding (docs/mtp.md).

How the bound llama.cpp runs it (common/speculative.cpp, `common_speculative_impl_draft_mtp`):
- The model is loaded once, with `llama_model_params.load_mtp = True` (else the `blk.N.nextn.*` block is
  skipped). The target context is an ordinary one on that model; the MTP head runs in a SECOND context on
  the same model with `ctx_type = LLAMA_CONTEXT_TYPE_MTP` (its graph is the one MTP block plus the LM head;
  its memory is a plain attention KV cache of that block, so positions can be cut back).
- The MTP head's input at position p is the token at p and the target's hidden state at p - 1 (after the
  final norm): `llama_set_embeddings_nextn(target, True, masked=False)` makes every target decode keep
  that state for every batch token (`llama_get_embeddings_nextn`). Both calls are in llama.cpp's staging
  header src/llama-ext.h, exported from libllama.so with C++-mangled names, and bound by llama-cpp-python in
  `llama_cpp.llama_cpp_ext` by those names.
- A token that carries both an id and a hidden-state row needs the extended batch (`llama_batch_ext_*`,
  `llama_batch_ext_set_embd_token`) and `llama_process`; a `llama_batch` carries one or the other.

So `MtpDrafter` (the engine's Drafter protocol, bindings/protocol.py) has two duties. After EVERY target
decode (prefill chunks, plain decode steps, verifications, re-decodes after a rollback), `observe()` feeds
each decoded token, paired with the target's hidden state of the position before it, into the MTP context:
that keeps the head's own KV cache in step with the sequence. `draft()` decodes the slot's last sampled
token (not yet decoded by the target) with the state of the position before it, takes the argmax, and
chains: each drafted token goes in with the head's own output state (`llama_get_embeddings_nextn_ith` of
the MTP context). Draft positions are removed from the head's KV afterwards, and whatever a slot's next
decode starts at is removed before it is fed: rejected drafts need no call. Optional calls keep the head in
step with the engine's cache ops (clear, truncate, copy, snapshot/restore); without them only the drafts'
quality suffers, never the output (every draft is verified).

Only `bindings/` imports llama_cpp; the engine reaches this through `MtpDrafter` and BatchEntry/DraftRequest.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama
import llama_cpp.llama_cpp_ext as llama_ext
import numpy as np
import numpy.typing as npt

from bindings.protocol import BackendError, BatchEntry, CacheOp, DraftRequest

F32 = npt.NDArray[np.float32]
logger = logging.getLogger(__name__)
# Target states kept per slot: more than any draft is long (a rejection rolls back inside the last decode).
_KEPT_ROWS = 64


class MtpError(BackendError):
    """The model has no MTP head, the MTP context could not be made, or an MTP decode failed."""


def load_model(path: Path, *, load_mtp: bool = True, use_extra_bufts: bool = False, n_gpu_layers: int = 0) -> Any:
    """llama_model_load_from_file with the MTP block loaded (`load_mtp`); free with `free_model`.

    The engine's own loader only needs `params.load_mtp = True` to serve the same purpose."""
    llama.llama_backend_init()
    params = llama.llama_model_default_params()
    params.load_mtp = load_mtp
    params.use_extra_bufts = use_extra_bufts  # off: the AMX path of these CPUs is broken (facts file)
    params.n_gpu_layers = n_gpu_layers
    model = llama.llama_model_load_from_file(os.fsencode(path), params)
    if not model:
        raise MtpError(f"llama.cpp could not load {path}")
    return model


def free_model(model: Any) -> None:
    llama.llama_model_free(model)


def n_mtp_layers(model: Any) -> int:
    """How many MTP (NextN) blocks the GGUF declares (`<arch>.nextn_predict_layers`); 0: no MTP head."""
    return int(llama.llama_model_n_layer_nextn(model))


def enable_target_hidden_states(target_ctx: Any) -> None:
    """Make every decode of `target_ctx` keep the final-norm hidden state of every batch token (what the MTP
    head reads). Call once, before the first decode the drafter is to observe."""
    llama_ext.llama_set_embeddings_nextn(target_ctx, True, False)


@dataclass(frozen=True)
class _Ask:
    """A draft for `slot`: `last_token` is its newest sampled token, at `position`, not yet decoded by the
    target; at most `n_max` tokens are proposed, for positions position + 1, ..."""

    slot: int
    last_token: int
    position: int
    n_max: int

    @classmethod
    def of(cls, request: DraftRequest) -> _Ask | None:
        if not request.output:  # nothing sampled yet: the prompt's last token is decoded already
            return None
        return cls(request.slot, request.output[-1], len(request.prompt) + len(request.output) - 1, request.n_max)


@dataclass(frozen=True)
class MtpSnapshot:
    """One slot's MTP state: the head's KV (llama_state_seq_get_data) and the target states it pairs next."""

    kv: bytes
    first: int
    rows: F32 | None

    @property
    def n_bytes(self) -> int:
        return len(self.kv) + (0 if self.rows is None else int(self.rows.nbytes))


@dataclass
class _SlotHidden:
    """The target's hidden states of a slot's latest observed positions: rows[i] is position first + i."""

    first: int = -1
    rows: F32 | None = None

    def at(self, position: int) -> F32 | None:
        if self.rows is None or not self.first <= position < self.first + len(self.rows):
            return None
        row: F32 = self.rows[position - self.first]
        return row


class MtpDrafter:
    """The Drafter protocol (bindings/protocol.py) over the MTP head of `model`, drafting for the sequences
    (slots) of `target_ctx` (see the module docstring).

    `model` must have been loaded with `load_mtp` (see `load_model`), and the caller says so with
    `mtp_loaded`: llama.cpp cannot be asked, and an MTP context on a model loaded without its MTP block
    aborts the whole process (GGML_ASSERT "MTP block missing nextn.eh_proj", src/models/qwen3next.cpp).
    `target_ctx` is a context on that model; its hidden states are turned on here
    (`enable_target_hidden_states`). Calls come from one thread. The caller frees the model and the target
    context, after close(). p_min: stop a slot's draft when the head's top probability falls below it.
    exact: an f32 KV cache and no flash attention (CPU flash attention rounds through f16), for checking the
    head's logits against a reference; the default f16 cache is what llama-server uses."""

    def __init__(
        self,
        model: Any,
        target_ctx: Any,
        *,
        mtp_loaded: bool,
        n_threads: int = 1,
        p_min: float = 0.0,
        n_batch: int | None = None,
        exact: bool = False,
    ) -> None:
        if n_mtp_layers(model) < 1:
            raise MtpError("the model has no MTP head (no nextn_predict_layers; converted with --no-mtp?)")
        if not mtp_loaded:
            raise MtpError("the model was loaded without its MTP block: load it with load_mtp=True")
        self.name = "mtp"
        self._model = model
        self._target = target_ctx
        self._p_min = p_min
        self._n_seq = int(llama.llama_n_seq_max(target_ctx))
        self._n_embd = int(llama.llama_model_n_embd_out(model))
        self._n_vocab = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model)))
        self._n_batch = n_batch or int(llama.llama_n_batch(target_ctx))
        self._hidden = [_SlotHidden() for _ in range(self._n_seq)]
        # The head's side of the target's "save" snapshots (by slot) and prompt-cache entries (by entry id):
        # one block's KV, a small fraction of what the target keeps for the same tokens.
        self._saved: dict[int, MtpSnapshot] = {}
        self._stashed: dict[int, MtpSnapshot] = {}
        self._ctx = self._new_context(n_threads, exact)
        self._batch = llama.llama_batch_ext_init(self._ctx)
        self._mem = llama.llama_get_memory(self._ctx)
        enable_target_hidden_states(target_ctx)
        # Masked: only the rows of outputs (the tokens whose logits are asked for) are kept.
        llama_ext.llama_set_embeddings_nextn(self._ctx, True, True)
        self._zeros = np.zeros(self._n_embd, dtype=np.float32)

    def _new_context(self, n_threads: int, exact: bool) -> Any:
        params = llama.llama_context_default_params()
        if exact:
            params.type_k = params.type_v = llama.GGML_TYPE_F32
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.ctx_type = llama.LLAMA_CONTEXT_TYPE_MTP
        # As many positions per sequence as the target: the head attends over the whole sequence.
        params.n_ctx = llama.llama_n_ctx(self._target)
        params.n_seq_max = self._n_seq
        params.n_batch = self._n_batch
        params.n_ubatch = self._n_batch
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.n_rs_seq = 0
        ctx = llama.llama_init_from_model(self._model, params)
        if not ctx:
            raise MtpError("llama.cpp could not make the MTP context (see its log)")
        return ctx

    @property
    def n_seq(self) -> int:
        return self._n_seq

    # ------------------------------------------------------------ keeping up with the target

    def observe(self, entries: Sequence[BatchEntry]) -> None:
        """Feed the tokens of the target decode that just ran (`entries`, in that decode's order) to the head.

        Must be called after every target decode and before the next one (the target keeps the hidden
        states of its last decode only). A token at position p goes in with the target's state at p - 1:
        from this decode, or kept from the slot's previous one; zeros where neither has it (a slot's first
        token, or a prefix restored from a cache), as llama.cpp's own driver does. Never raises (the Drafter
        protocol): if the head's decode fails, the slots involved draft nothing until their next decode."""
        try:
            self._feed(entries, logits=False)
        except BackendError as exc:
            logger.warning("MTP head lost track of slots %s: %s", sorted({e.slot for e in entries}), exc)
            for entry in entries:
                if 0 <= entry.slot < self._n_seq:
                    self._hidden[entry.slot] = _SlotHidden()

    def observe_with_logits(self, entries: Sequence[BatchEntry]) -> F32:
        """observe(), returning the head's logits at every fed token (rows in batch order; row i predicts the
        token after the next one), for checking the head against a reference. Raises MtpError."""
        rows = self._feed(entries, logits=True)
        if rows is None:
            raise MtpError("no tokens to observe")
        return rows

    def _feed(self, entries: Sequence[BatchEntry], *, logits: bool) -> F32 | None:
        for entry in entries:
            self._check_slot(entry.slot)
        n_tokens = sum(len(entry.tokens) for entry in entries)
        if n_tokens == 0:
            return None
        states = self._target_states(n_tokens)
        self._clear_batch()
        row = 0
        for entry in entries:
            llama.llama_memory_seq_rm(self._mem, entry.slot, entry.start_pos, -1)  # stale drafts / rewinds
            before = self._hidden[entry.slot].at(entry.start_pos - 1)
            for offset, token in enumerate(entry.tokens):
                state = states[row + offset - 1] if offset else (self._zeros if before is None else before)
                self._add(entry.slot, token, entry.start_pos + offset, state, output=logits)
            # Kept: the state before the entry and its own, at most _KEPT_ROWS (a verification rolls back
            # within its own entry; a long prompt chunk needs only its last state).
            kept = np.vstack([self._zeros if before is None else before, states[row : row + len(entry.tokens)]])
            first = entry.start_pos - 1 + max(0, len(kept) - _KEPT_ROWS)
            self._hidden[entry.slot] = _SlotHidden(first, kept[-_KEPT_ROWS:].copy())
            row += len(entry.tokens)
        self._process()
        if not logits:
            return None
        rows = [llama.llama_get_logits_ith(self._ctx, i) for i in range(n_tokens)]
        return np.stack([np.ctypeslib.as_array(r, shape=(self._n_vocab,)) for r in rows]).astype(np.float32)

    def truncate(self, slot: int, n_keep: int) -> None:
        """Forget positions n_keep.. of `slot` (rejected drafts after a verification)."""
        self._check_slot(slot)
        llama.llama_memory_seq_rm(self._mem, slot, n_keep, -1)

    def kv_state(self, slot: int) -> bytes:
        """The head's KV cache of `slot` as llama.cpp serializes it (to check two histories left the same)."""
        self._check_slot(slot)
        size = int(llama.llama_state_seq_get_size(self._ctx, slot))
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama.llama_state_seq_get_data(self._ctx, buffer, size, slot))
        return bytes(buffer[:written])

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        llama.llama_memory_seq_rm(self._mem, slot, 0, -1)
        self._hidden[slot] = _SlotHidden()

    def copy(self, src: int, dst: int) -> None:
        """Make `dst` what `src` is (the engine's "copy" CacheOp: n > 1 choices after a shared prefill)."""
        self._check_slot(src)
        self.clear(dst)
        llama.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        self._hidden[dst] = replace(self._hidden[src])

    def snapshot(self, slot: int) -> MtpSnapshot:
        """The head's side of `slot` (its KV and the target's last kept states), to go with a saved or stashed
        target state (the engine's "save"/"stash" CacheOps): `restore` brings both back together."""
        hidden = self._hidden[slot]
        rows = None if hidden.rows is None else hidden.rows.copy()
        return MtpSnapshot(self.kv_state(slot), hidden.first, rows)

    def restore(self, slot: int, snapshot: MtpSnapshot) -> None:
        """Replace `slot`'s head state by `snapshot` (the engine's "restore"/"load" CacheOps)."""
        self.clear(slot)
        data = (ctypes.c_uint8 * len(snapshot.kv)).from_buffer_copy(snapshot.kv)
        if snapshot.kv and int(llama.llama_state_seq_set_data(self._ctx, data, len(snapshot.kv), slot)) == 0:
            raise MtpError(f"could not restore the MTP head's state of slot {slot}")
        rows = None if snapshot.rows is None else snapshot.rows.copy()
        self._hidden[slot] = _SlotHidden(snapshot.first, rows)

    def follow(self, ops: Sequence[CacheOp]) -> None:
        """Apply the engine's cache ops of a step (already applied to the target, in plan order) to the head,
        so a slot whose memory was cleared, copied or restored from a snapshot or the prompt cache drafts from
        the matching head state. "checkpoint"/"rollback" need nothing (observe() cuts the head back to where
        the next decode starts). Never raises: a slot the head loses track of is cleared (its drafts are then
        worse until its head KV fills again, never wrong: every draft is verified)."""
        for op in ops:
            try:
                self._follow(op)
            except BackendError as exc:
                logger.warning("MTP head could not follow %s of slot %d: %s", op.kind, op.slot, exc)
                if 0 <= op.slot < self._n_seq:
                    self.clear(op.slot)

    def _follow(self, op: CacheOp) -> None:
        if op.kind == "clear":
            self.clear(op.slot)
        elif op.kind == "truncate":
            self.truncate(op.slot, op.n_keep)
        elif op.kind == "copy":
            self.copy(op.src, op.slot)
        elif op.kind == "save":
            self._saved[op.slot] = self.snapshot(op.slot)
        elif op.kind == "stash":
            self._stashed[op.entry] = self.snapshot(op.slot)
        elif op.kind == "drop":
            self._stashed.pop(op.entry, None)
        elif op.kind in ("restore", "load"):
            snapshot = self._saved.get(op.slot) if op.kind == "restore" else self._stashed.get(op.entry)
            if snapshot is None:
                self.clear(op.slot)
            else:
                self.restore(op.slot, snapshot)

    # ------------------------------------------------------------ drafting (the Drafter protocol)

    def draft(self, requests: Sequence[DraftRequest]) -> list[tuple[int, ...]]:
        """Drafts for each request, in order (all slots in one MTP decode per draft position).

        The token to draft after is the request's last output token (not yet decoded by the target), at
        position len(prompt) + len(output) - 1. A slot whose target state at the position before is not known
        (no observe() covered it) gets no draft, nor does a request with no output yet. A slot's draft stops
        at n_max tokens, or when the head's top probability falls under p_min."""
        for request in requests:
            self._check_slot(request.slot)
        asks = [_Ask.of(request) for request in requests]
        drafts: list[list[int]] = [[] for _ in requests]
        active: dict[int, int] = {}  # request index → batch index of its newest token
        self._clear_batch()
        for index, ask in enumerate(asks):
            state = None if ask is None else self._hidden[ask.slot].at(ask.position - 1)
            if ask is None or state is None or ask.n_max < 1:
                continue
            llama.llama_memory_seq_rm(self._mem, ask.slot, ask.position, -1)
            active[index] = self._add(ask.slot, ask.last_token, ask.position, state, output=True)
        try:
            self._draft_steps(asks, drafts, active)
        finally:
            for ask in asks:  # the verification decode feeds the real tokens at these positions
                if ask is not None:
                    llama.llama_memory_seq_rm(self._mem, ask.slot, ask.position, -1)
        return [tuple(draft) for draft in drafts]

    def forget(self, key: int) -> None:
        """Nothing to drop: what the head holds is per slot, and the next request there overwrites it."""

    def _draft_steps(self, asks: Sequence[_Ask | None], drafts: list[list[int]], active: dict[int, int]) -> None:
        while active:
            self._process()
            picks = {index: self._pick(batch_index) for index, batch_index in active.items()}
            self._clear_batch()
            next_active: dict[int, int] = {}
            for index, (token, confident, state) in picks.items():
                request = asks[index]
                assert request is not None  # only asks are active
                if not confident:
                    continue
                drafts[index].append(token)
                if len(drafts[index]) >= request.n_max:
                    continue
                position = request.position + len(drafts[index])
                next_active[index] = self._add(request.slot, token, position, state, output=True)
            active = next_active

    def _pick(self, batch_index: int) -> tuple[int, bool, F32]:
        """The head's argmax at `batch_index`, whether it is confident enough, and its output state."""
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, batch_index), shape=(self._n_vocab,))
        token = int(np.argmax(logits))
        confident = True
        if self._p_min > 0.0:
            shifted = np.exp(logits - logits[token])
            confident = float(1.0 / shifted.sum()) >= self._p_min
        pointer = llama_ext.llama_get_embeddings_nextn_ith(self._ctx, batch_index)
        if not pointer:
            raise MtpError(f"the MTP context returned no hidden state for batch index {batch_index}")
        state = np.ctypeslib.as_array(pointer, shape=(self._n_embd,)).copy()
        return token, confident, state

    # ------------------------------------------------------------ plumbing

    def _check_slot(self, slot: int) -> None:
        # llama.cpp asserts (aborting the process) on a sequence id beyond n_seq_max.
        if not 0 <= slot < self._n_seq:
            raise MtpError(f"slot {slot} is not one of the {self._n_seq} sequences of the target context")

    def _target_states(self, n_tokens: int) -> F32:
        pointer = llama_ext.llama_get_embeddings_nextn(self._target)
        if not pointer:
            raise MtpError("the target context kept no hidden states (enable_target_hidden_states before decoding)")
        states: F32 = np.ctypeslib.as_array(pointer, shape=(n_tokens, self._n_embd))
        return states

    def _clear_batch(self) -> None:
        llama.llama_batch_ext_clear(self._batch)

    def _add(self, slot: int, token: int, position: int, state: F32, *, output: bool) -> int:
        index = int(llama.llama_batch_ext_add_token(self._batch, slot, token))
        if index < 0:
            raise MtpError(f"the MTP batch refused a token (code {index}: full, or slot {slot} out of range)")
        pos = llama.llama_pos(position)
        row = np.ascontiguousarray(state, dtype=np.float32)
        embd = llama.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self._n_embd)
        # llama_batch_ext copies the row, so `row` may go once this returns.
        if not (
            llama.llama_batch_ext_set_pos(self._batch, index, ctypes.byref(pos))
            and llama.llama_batch_ext_set_embd_token(self._batch, index, embd)
            and llama.llama_batch_ext_set_output_logits(self._batch, index, output)
        ):
            raise MtpError(f"the MTP batch refused position {position} / hidden state of slot {slot}")
        return index

    def _process(self) -> None:
        code = int(llama.llama_process(self._ctx, llama.LLAMA_PROCESS_TYPE_DECODE, self._batch))
        if code != 0:
            raise MtpError(f"the MTP decode failed (llama_process returned {code})")

    def close(self) -> None:
        self._saved.clear()
        self._stashed.clear()
        if self._batch is not None:
            llama.llama_batch_ext_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama.llama_free(self._ctx)
            self._ctx = None


class SimpleTarget:
    """A minimal target context: decode one sequence's tokens with logits at every position, and a checkpoint
    of a sequence's recurrent state for rolling back rejected drafts on hybrid models.

    It exists to prove the drafter end to end without the engine (tests/mtp, docs/mtp.md); the server's
    target is LlamaBackend. Rolling back follows llama-server for qwen3next, whose recurrent state cannot
    be cut back (llama_memory_seq_rm of a partial range fails; `n_rs_seq` snapshots are not offered for
    this architecture): save the recurrent state before a verification (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY:
    the recurrent part only, small), and after a partial acceptance restore it, cut the attention KV back,
    and decode the accepted tokens again."""

    def __init__(self, model: Any, *, n_seq: int = 1, n_ctx: int = 512, n_batch: int = 64, n_threads: int = 1) -> None:
        self._model = model
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_seq_max = n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.type_k = llama.GGML_TYPE_F32
        params.type_v = llama.GGML_TYPE_F32
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            raise MtpError("llama.cpp could not make the target context")
        self.ctx: Any = ctx
        self._n_vocab = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model)))
        self._batch = llama.llama_batch_init(n_batch, 0, 1)
        self._checkpoints: dict[int, tuple[Any, int]] = {}

    def decode(self, tokens: Sequence[int], start_pos: int, seq: int = 0) -> F32:
        """Decode `tokens` at start_pos.. of sequence `seq`; the logits after each of them, one row per token."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = True
        code = int(llama.llama_decode(self.ctx, batch))
        if code != 0:
            raise MtpError(f"the target decode failed (llama_decode returned {code})")
        return np.stack(
            [
                np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, i), shape=(self._n_vocab,))
                for i in range(len(tokens))
            ]
        ).astype(np.float32)

    def save(self, n_tokens: int, seq: int = 0) -> None:
        """Checkpoint the recurrent state of sequence `seq`, which holds `n_tokens` tokens now."""
        flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = int(llama.llama_state_seq_get_size_ext(self.ctx, seq, flags))
        buffer = (ctypes.c_uint8 * size)()
        if int(llama.llama_state_seq_get_data_ext(self.ctx, buffer, size, seq, flags)) != size:
            raise MtpError("could not save the target's recurrent state")
        self._checkpoints[seq] = (buffer, n_tokens)

    def rollback(self, seq: int = 0) -> int:
        """Back to `seq`'s last checkpoint: its recurrent state, and attention KV cut to its length (returned)."""
        if seq not in self._checkpoints:
            raise MtpError(f"no checkpoint of sequence {seq} to roll back to")
        buffer, n_tokens = self._checkpoints[seq]
        flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        if int(llama.llama_state_seq_set_data_ext(self.ctx, buffer, len(buffer), seq, flags)) == 0:
            raise MtpError("could not restore the target's recurrent state")
        if not llama.llama_memory_seq_rm(llama.llama_get_memory(self.ctx), seq, n_tokens, -1):
            raise MtpError(f"could not cut the target's KV cache back to {n_tokens} tokens")
        return n_tokens

    def close(self) -> None:
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:
            llama.llama_free(self.ctx)
            self.ctx = None
