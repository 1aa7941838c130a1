"""A deterministic stand-in for llama.cpp: same protocol, no model. For tests and dry runs.

Vocabulary: token ids 0..255 are the bytes, then a few control tokens. The "model" derives a logit vector
from a hash of the last tokens of the slot's sequence and their position, so a sequence's output depends
only on its own tokens — never on what else shares the batch — exactly the property the real engine must
keep. The fake also checks what the scheduler asks of it (positions must continue the slot's memory,
truncation only where supported), models what a slot's state takes in bytes (a fixed recurrent part plus a KV
part per token, like llama_state_seq_get_size), and can inject failures (decode, any memory op) and delays.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bindings.protocol import (
    BackendError,
    BatchEntry,
    CacheOp,
    DecodeError,
    ModelInfo,
    SampledToken,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
CONTROL_TEXT = {BOS: "<s>", EOS: "</s>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
N_VOCAB = 260
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class FakeBackendConfig:
    n_slots: int = 4
    n_ctx_per_slot: int = 256
    n_batch: int = 64
    supports_partial_removal: bool = True
    chat_template: str | None = CHATML_TEMPLATE
    add_bos: bool = False  # whether tokenize(add_special=True) puts BOS first, as llama.cpp does for such models
    step_delay_s: float = 0.0  # sleep inside each decode, to make concurrency observable
    fail_on_token: int | None = None  # decode raises DecodeError when a batch contains this token
    failing_ops: frozenset[str] = frozenset()  # memory-op kinds ("load", "stash", ...) that raise BackendError
    state_bytes_per_token: int = 1024  # a slot's state: this much KV per cached token ...
    state_bytes_fixed: int = 0  # ... plus this much recurrent state (Qwen3-Next: 75 MiB at any length)
    eos_logit: float = -2.0  # how likely the model is to end on its own (greedy: only with logit_bias)
    name: str = "fake-model"
    # Every answer is this text (its UTF-8 bytes, one token each), then EOS: an output to test parsing with.
    script: str | None = None


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)


class FakeBackend:
    def __init__(self, config: FakeBackendConfig | None = None) -> None:
        self.config = config or FakeBackendConfig()
        self._slots = [_Slot() for _ in range(self.config.n_slots)]
        self._snapshots: dict[int, list[int]] = {}
        self._checkpoints: dict[int, list[int]] = {}  # speculation's rollback points ("checkpoint"/"rollback")
        self._stashed: dict[int, list[int]] = {}  # the prompt cache: entry id → tokens
        self.failing_ops: set[str] = set(self.config.failing_ops)  # tests may change it between steps
        self._samplers: dict[int, np.random.Generator] = {}
        self._penalty_history: dict[int, list[int]] = {}
        self._logits: np.ndarray = np.zeros((0, N_VOCAB), dtype=np.float32)
        self._outputs: frozenset[int] = frozenset()  # rows of the last decode that have logits
        self._prompt_logprobs: dict[int, tuple[TokenLogprob, ...]] = {}  # by slot, from the last decode
        self.n_decode_calls = 0
        self.thread_counts: list[int] = []  # every set_threads call, in order
        self.batches: list[tuple[BatchEntry, ...]] = []  # every decoded batch, for assertions
        self.ops: list[CacheOp] = []  # every memory op applied
        self.grammars: list[str] = []  # the grammar of every sampler built with one, in order
        self.grammar_triggers: list[tuple[str, ...]] = []  # and its trigger patterns (lazy grammars)
        self.closed = False
        self._info = ModelInfo(
            name=self.config.name,
            architecture="fake",
            n_vocab=N_VOCAB,
            n_ctx_train=self.config.n_ctx_per_slot,
            n_slots=self.config.n_slots,
            n_ctx_per_slot=self.config.n_ctx_per_slot,
            n_batch=self.config.n_batch,
            supports_partial_removal=self.config.supports_partial_removal,
            bos_token=BOS,
            eos_token=EOS,
            add_bos=self.config.add_bos,
            chat_template=self.config.chat_template,
        )

    # --- Vocab ---------------------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self._info

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        tokens: list[int] = [BOS] if add_special and self._info.add_bos else []
        rest = text
        while rest:
            control = next((t for t, s in CONTROL_TEXT.items() if parse_special and rest.startswith(s)), None)
            if control is not None:
                tokens.append(control)
                rest = rest[len(CONTROL_TEXT[control]) :]
                continue
            tokens.extend(rest[0].encode())
            rest = rest[1:]
        return tokens

    def piece(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def is_eog(self, token: int) -> bool:
        return token in (EOS, IM_END)

    def token_text(self, token: int) -> str:
        return CONTROL_TEXT.get(token, bytes([token]).decode("latin-1") if token < 256 else "")

    # --- memory --------------------------------------------------------------------------------------
    def apply(self, ops: Sequence[CacheOp]) -> None:
        for op in ops:
            self.ops.append(op)
            slot = self._slots[op.slot]
            if op.kind in self.failing_ops:
                if op.kind == "stash":
                    self._stashed.pop(op.entry, None)  # as llama_backend: a half-written entry is not kept
                raise BackendError(f"injected {op.kind} failure")
            if op.kind == "clear":
                slot.tokens = []
            elif op.kind == "truncate":
                if not self.config.supports_partial_removal:
                    raise BackendError("partial removal is not supported by this (recurrent) model")
                del slot.tokens[op.n_keep :]
            elif op.kind == "save":
                self._snapshots[op.slot] = list(slot.tokens)
            elif op.kind == "restore":
                if op.slot not in self._snapshots:
                    raise BackendError(f"slot {op.slot} has no saved state")
                slot.tokens = list(self._snapshots[op.slot])
            elif op.kind == "copy":
                slot.tokens = list(self._slots[op.src].tokens)
            elif op.kind == "stash":
                actual = self._state_bytes(len(slot.tokens))
                if op.n_bytes and op.n_bytes != actual:  # the scheduler sized it from another state than this
                    raise BackendError(f"stash of slot {op.slot}: budgeted {op.n_bytes} bytes, the state has {actual}")
                self._stashed[op.entry] = list(slot.tokens)
            elif op.kind == "load":
                if op.entry not in self._stashed:
                    raise BackendError(f"no stashed state {op.entry}")
                slot.tokens = list(self._stashed[op.entry])
            elif op.kind == "drop":
                self._stashed.pop(op.entry, None)
            elif op.kind == "checkpoint":
                self._checkpoints[op.slot] = list(slot.tokens)
            elif op.kind == "rollback":
                self._rollback(op)
            else:
                raise BackendError(f"unknown cache op {op.kind!r}")

    def _rollback(self, op: CacheOp) -> None:
        slot = self._slots[op.slot]
        if self.config.supports_partial_removal:
            del slot.tokens[op.n_keep :]
            return
        checkpoint = self._checkpoints.get(op.slot)
        if checkpoint is None:
            raise BackendError(f"rollback of slot {op.slot}: no checkpoint was taken")
        if len(checkpoint) != op.n_keep or slot.tokens[: op.n_keep] != checkpoint:
            raise BackendError(
                f"rollback of slot {op.slot} to {op.n_keep} tokens: its checkpoint holds {len(checkpoint)}"
            )
        slot.tokens = list(checkpoint)

    def state_size(self, slot: int) -> int:
        return self._state_bytes(len(self._slots[slot].tokens))

    def _state_bytes(self, n_tokens: int) -> int:
        return self.config.state_bytes_fixed + self.config.state_bytes_per_token * n_tokens

    def n_stashed(self) -> int:
        return len(self._stashed)

    def stashed_entry_ids(self) -> set[int]:
        return set(self._stashed)

    def stashed_bytes(self) -> int:
        return sum(self._state_bytes(len(tokens)) for tokens in self._stashed.values())

    def slot_tokens(self, slot: int) -> list[int]:
        return list(self._slots[slot].tokens)

    # --- decode and sample ---------------------------------------------------------------------------
    def decode(self, entries: Sequence[BatchEntry]) -> None:
        self.n_decode_calls += 1
        if self.config.step_delay_s:
            time.sleep(self.config.step_delay_s)
        n_tokens = sum(len(e.tokens) for e in entries)
        if n_tokens > self.config.n_batch:
            raise DecodeError(f"batch of {n_tokens} tokens exceeds n_batch {self.config.n_batch}")
        if self.config.fail_on_token is not None and any(self.config.fail_on_token in e.tokens for e in entries):
            raise DecodeError("injected decode failure")
        self._check_positions(entries)
        self.batches.append(tuple(entries))
        logits = np.zeros((n_tokens, N_VOCAB), dtype=np.float32)
        row = 0
        for entry in entries:
            slot = self._slots[entry.slot]
            for token in entry.tokens:
                slot.tokens.append(token)
                if len(slot.tokens) > self.config.n_ctx_per_slot:
                    raise DecodeError(f"slot {entry.slot} is past its context")
                logits[row] = self._model(slot.tokens)
                row += 1
        self._logits = logits
        self._outputs = self._output_rows(entries)
        self._prompt_logprobs = self._entry_logprobs(entries)

    @staticmethod
    def _output_rows(entries: Sequence[BatchEntry]) -> frozenset[int]:
        """The rows llama.cpp would have logits for: each entry's last n_logits when logits_last (its drafted
        positions when speculating), and its logprob targets' positions."""
        rows: set[int] = set()
        end = 0
        for entry in entries:
            start, end = end, end + len(entry.tokens)
            if entry.logits_last:
                rows.update(range(end - min(entry.n_logits, len(entry.tokens)), end))
            rows.update(range(start, start + len(entry.logprob_targets)))
        return frozenset(rows)

    def _entry_logprobs(self, entries: Sequence[BatchEntry]) -> dict[int, tuple[TokenLogprob, ...]]:
        """As llama_backend does after a decode: each logprob target's logprob under its position's logits."""
        by_slot = {}
        row = 0
        for entry in entries:
            if len(entry.logprob_targets) > len(entry.tokens):
                raise DecodeError(f"slot {entry.slot}: more logprob targets than tokens")
            by_slot[entry.slot] = tuple(
                self._top_logprobs(self._logits[row + offset].astype(np.float64), target, entry.top_logprobs)
                for offset, target in enumerate(entry.logprob_targets)
            )
            row += len(entry.tokens)
        return {slot: logprobs for slot, logprobs in by_slot.items() if logprobs}

    def prompt_logprobs(self, slot: int) -> tuple[TokenLogprob, ...]:
        return self._prompt_logprobs.get(slot, ())

    def _check_positions(self, entries: Sequence[BatchEntry]) -> None:
        slots = [e.slot for e in entries]
        if slots != sorted(slots) or len(set(slots)) != len(slots):
            raise DecodeError(f"batch slots must ascend without repeats, got {slots}")
        for entry in entries:
            if entry.start_pos != len(self._slots[entry.slot].tokens):
                raise DecodeError(
                    f"slot {entry.slot}: batch starts at {entry.start_pos}, memory holds "
                    f"{len(self._slots[entry.slot].tokens)} tokens"
                )

    def _model(self, tokens: list[int]) -> np.ndarray:
        key = np.asarray([*tokens[-4:], len(tokens)], dtype=np.int64).tobytes()
        rng = np.random.default_rng(zlib.crc32(key))
        logits = rng.normal(0.0, 2.0, N_VOCAB).astype(np.float32)
        logits[:32] -= 8.0  # ASCII control characters: rare
        logits[128:256] = -30.0  # no raw high bytes: keeps output valid UTF-8 text
        logits[[BOS, IM_START, IM_END]] = -30.0
        logits[EOS] = self.config.eos_logit
        return logits

    def new_sampler(self, sampler_id: int, params: SamplingParams) -> None:
        # The fake model cannot follow a grammar; it records each one so API tests see what reached the sampler.
        if params.grammar is not None:
            self.grammars.append(params.grammar)
            self.grammar_triggers.append(params.grammar_triggers)
        self._samplers[sampler_id] = np.random.default_rng(params.seed if params.seed is not None else None)
        self._penalty_history[sampler_id] = []

    def set_threads(self, n_threads: int) -> None:
        if n_threads < 1:
            raise BackendError(f"need at least one thread, got {n_threads}")
        self.thread_counts.append(n_threads)

    def free_sampler(self, sampler_id: int) -> None:
        self._samplers.pop(sampler_id, None)
        self._penalty_history.pop(sampler_id, None)

    def sample(self, sampler_id: int, logits_index: int, params: SamplingParams) -> SampledToken:
        if logits_index not in self._outputs:
            raise BackendError(f"the last decode produced no logits at batch index {logits_index}")
        raw = self._logits[logits_index].astype(np.float64)
        history = self._penalty_history[sampler_id]
        logits = self._penalized(raw.copy(), history[-params.penalty_last_n :], params)
        token = self._choose(logits, self._samplers[sampler_id], params)
        if self.config.script is not None:
            script = self.config.script.encode()
            token = script[len(history)] if len(history) < len(script) else EOS
        history.append(token)
        logprob = self._logprob(raw, token, params) if params.logprobs else None
        return SampledToken(token, logprob)

    def probabilities(self, sampler_id: int, logits_index: int, params: SamplingParams) -> np.ndarray:
        """The distribution sample() draws the next token of `sampler_id` from at `logits_index` now (after its
        penalties so far), without sampling: what tests of the speculative acceptance rule compare with."""
        raw = self._logits[logits_index].astype(np.float64)
        history = self._penalty_history[sampler_id]
        logits = self._penalized(raw.copy(), history[-params.penalty_last_n :], params)
        return self._distribution(logits, params)

    def greedy_continuation(self, tokens: Sequence[int], n: int, params: SamplingParams | None = None) -> list[int]:
        """The next n tokens a greedy sampler (with `params`' logit biases) would pick after `tokens`: the "model"
        is a pure function of a sequence's tokens, so tests can build drafts that are right or wrong on purpose."""
        history = list(tokens)
        out = []
        for _ in range(n):
            logits = self._model(history).astype(np.float64)
            for token, bias in (params.logit_bias if params else {}).items():
                logits[token] += bias
            out.append(int(np.argmax(logits)))
            history.append(out[-1])
        return out

    def n_live_samplers(self) -> int:
        return len(self._samplers)

    @staticmethod
    def _penalized(logits: np.ndarray, recent: list[int], params: SamplingParams) -> np.ndarray:
        for token, bias in params.logit_bias.items():
            logits[token] += bias
        # An extreme penalty (repeat_penalty 5e-324) overflows a logit to inf, as in float32 C: _choose copes.
        with np.errstate(over="ignore"):
            return FakeBackend._apply_penalties(logits, recent, params)

    @staticmethod
    def _apply_penalties(logits: np.ndarray, recent: list[int], params: SamplingParams) -> np.ndarray:
        for token in set(recent):
            count = recent.count(token)
            if params.repeat_penalty != 1.0:
                logits[token] = (
                    logits[token] / params.repeat_penalty
                    if logits[token] > 0
                    else logits[token] * params.repeat_penalty
                )
            logits[token] -= count * params.frequency_penalty + params.presence_penalty
        return logits

    @staticmethod
    def _choose(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
        if params.greedy:
            logits = np.nan_to_num(logits, nan=-np.inf, posinf=float(np.finfo(np.float32).max))
            return int(np.argmax(logits))
        probs = FakeBackend._distribution(logits, params)
        return int(rng.choice(len(probs), p=probs))

    @staticmethod
    def _distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
        # An extreme penalty (repeat_penalty 5e-324) overflows a logit to inf; llama.cpp still samples then
        logits = np.nan_to_num(logits, nan=-np.inf, posinf=float(np.finfo(np.float32).max))
        if params.greedy:
            probs = np.zeros_like(logits)
            probs[int(np.argmax(logits))] = 1.0
            return probs
        if params.top_k > 0:
            logits[np.argsort(logits)[: -params.top_k]] = -np.inf
        probs = np.exp((logits - logits.max()) / params.temperature)
        probs /= probs.sum()
        if params.min_p > 0:
            probs[probs < params.min_p * probs.max()] = 0.0
        if params.top_p < 1.0:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < params.top_p
            keep[0] = True  # as llama.cpp's top-p (min_keep 1): top_p 0 keeps the most likely token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs[~mask] = 0.0
        normalized: np.ndarray = probs / probs.sum()
        return normalized

    def _logprob(self, logits: np.ndarray, token: int, params: SamplingParams) -> TokenLogprob:
        return self._top_logprobs(logits, token, params.top_logprobs)

    def _top_logprobs(self, logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top = np.argsort(-logprobs)[:n_top]
        return TokenLogprob(
            token=token,
            text=self.piece(token),
            logprob=float(logprobs[token]),
            top=tuple(TopLogprob(int(t), self.piece(int(t)), float(logprobs[t])) for t in top),
        )

    def close(self) -> None:
        self.closed = True
