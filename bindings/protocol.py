"""The small protocol between the engine and whatever runs the model, and the data both sides exchange.

It lives here, in the bindings package, because `LlamaBackend` (bindings/llama_backend.py, the only
importer of the llama.cpp bindings) implements it and may import nothing from `server/`; the engine and
`FakeBackend` (server/engine/fake_backend.py, deterministic, for tests and dry runs) use it too. This module
imports nothing but the standard library, so depending on it never pulls llama.cpp in. Every method is called from the
engine thread only, except the `Vocab` ones (tokenize, piece, is_eog, chat template), which are
read-only and may be called from any thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol


class BackendError(RuntimeError):
    """The model could not be loaded or a call into it failed."""


class DecodeError(BackendError):
    """llama_decode failed for one batch; only the sequences in that batch are failed."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Validated by the API before it gets here."""

    max_tokens: int | None = None  # None: until end-of-generation or the slot's context is full
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    min_p: float = 0.0  # 0 → off
    seed: int | None = None  # None → a random seed per sequence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # llama.cpp's multiplicative penalty; 1 → off
    penalty_last_n: int = 64  # how many recent generated tokens the penalties look at
    logit_bias: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them and they are never emitted
    ignore_eos: bool = False
    logprobs: bool = False  # return the chosen token's log-probability
    top_logprobs: int = 0  # and this many alternatives per position (0..20)
    grammar: str | None = None  # GBNF text (root rule "root") every answer must match: response_format
    # Non-empty: the grammar is lazy (tool_choice auto): free text until one of these regexes matches the
    # output so far, then the grammar holds from the match on (llama_sampler_init_grammar_lazy_patterns).
    grammar_triggers: tuple[str, ...] = ()
    # Speculative decoding may draft for this request (it never changes what is sampled, only how many tokens
    # one decode yields); False: the API's per-request opt-out ("speculative": false).
    speculative: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TopLogprob:
    token: int
    text: bytes  # the token's raw bytes (may be part of a UTF-8 character)
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the model, and the best alternatives."""

    token: int
    text: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """What the engine and the API need to know about the loaded model and context."""

    name: str
    architecture: str
    n_vocab: int
    n_ctx_train: int
    n_slots: int  # sequences in the context (llama_context n_seq_max)
    n_ctx_per_slot: int  # positions one slot can hold
    n_batch: int  # most tokens one decode call accepts
    supports_partial_removal: bool  # False on recurrent / hybrid models (qwen3next)
    bos_token: int | None
    eos_token: int | None
    add_bos: bool
    chat_template: str | None
    n_params: int = 0
    size_bytes: int = 0


@dataclass(frozen=True)
class BatchEntry:
    """Tokens of one slot in one decode: positions start_pos.., logits wanted for the last one or not."""

    slot: int
    tokens: tuple[int, ...]
    start_pos: int
    logits_last: bool
    # Prompt logprobs (/v1/completions echo + logprobs): the token that follows each position from the first,
    # whose log-probability under that position's logits the backend computes right after the decode (see
    # Backend.prompt_logprobs). At most len(tokens): a prompt's last chunk omits its last position, whose
    # logits predict the first generated token and are sampled as usual.
    logprob_targets: tuple[int, ...] = ()
    top_logprobs: int = 0  # and this many best alternatives at each of those positions
    # Speculative decoding: with logits_last, logits for the last n_logits positions (the slot's last accepted
    # token and its drafted tokens, each position verifying the next), read at consecutive batch indices.
    n_logits: int = 1


@dataclass(frozen=True)
class SampledToken:
    token: int
    logprob: TokenLogprob | None = None  # filled only when the request asked for logprobs


@dataclass(frozen=True)
class CacheOp:
    """A change to a slot's memory, applied before the step's decode, in plan order.

    kind:
      "clear"    — forget everything in `slot`.
      "truncate" — keep positions [0, n_keep) of `slot` (only where supports_partial_removal).
      "save"     — snapshot `slot`'s whole sequence state (replacing its previous snapshot).
      "restore"  — replace `slot`'s state by its snapshot.
      "copy"     — make `slot` an exact copy of slot `src` (n > 1 choices after a shared prefill).
      "stash"    — copy `slot`'s whole state into prompt-cache entry `entry` (in RAM, outside the context).
      "load"     — replace `slot`'s state by prompt-cache entry `entry` (the entry stays).
      "drop"     — forget prompt-cache entry `entry` (`slot` is unused); dropping an unknown entry is a no-op,
                   so a drop may be repeated after a failed step.
      "checkpoint" — (speculative decoding on models without partial removal) snapshot only the part of
                   `slot`'s state that cannot be cut back (the recurrent state; llama.cpp's
                   LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY), replacing its previous checkpoint. Cheap: no KV.
      "rollback" — restore `slot`'s checkpoint and drop its positions from n_keep on (the checkpoint's
                   length); where supports_partial_removal it is just a truncate.
    """

    kind: str
    slot: int
    n_keep: int = 0
    src: int = -1
    entry: int = -1
    n_bytes: int = 0  # "stash": the slot's state size the scheduler budgeted for (state_size when planned)


@dataclass(frozen=True)
class DraftRequest:
    """One slot's ask for draft tokens: its sequence so far (prompt, then output; the last output token is the
    one the next decode feeds back) and how many tokens at most. `key` names the sequence (engine-unique), so
    a drafter may keep per-sequence state (an n-gram index) and drop it with `forget`."""

    key: int
    slot: int
    prompt: Sequence[int]
    output: Sequence[int]  # the sequence's own list (not a copy): read it during draft() only
    n_max: int


class Drafter(Protocol):
    """Proposes the tokens that probably follow a sequence, deterministically (a point-mass proposal: see
    server/engine/speculation.py for why that keeps sampling exact). Engine thread only.

    Implementations: n-gram self-speculation (server/engine/speculation.py, pure Python), a small draft model
    (bindings/draft_model.py), and Qwen3-Next's multi-token-prediction head (bindings/mtp.py, which also follows
    the slots' cache ops: server/engine/speculation.py CacheFollower)."""

    name: str

    def draft(self, requests: Sequence[DraftRequest]) -> list[tuple[int, ...]]:
        """Drafts for every request, in order (each at most its n_max tokens, possibly empty). Raises
        BackendError when a model behind it fails; the engine then drafts nothing that step."""
        ...

    def forget(self, key: int) -> None:
        """The sequence `key` finished: drop whatever was kept for it."""
        ...

    def observe(self, entries: Sequence[BatchEntry]) -> None:
        """Called after every target decode with its entries, before sampling: a drafter that needs the target's
        per-position state (an MTP head reads the hidden states of exactly those positions) takes it here; the
        others do nothing. Must not raise: a drafter that loses track drafts nothing."""
        ...

    def close(self) -> None:
        """Free what the drafter holds (a draft model's context); called once, when the engine stops."""
        ...


class Vocab(Protocol):
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def piece(self, token: int) -> bytes:
        """The token's output bytes (special/control tokens render as b"")."""
        ...

    def is_eog(self, token: int) -> bool: ...

    def token_text(self, token: int) -> str:
        """The token's text as stored in the vocabulary (for rendering BOS/EOS in chat templates)."""
        ...


class Backend(Vocab, Protocol):
    @property
    def info(self) -> ModelInfo: ...

    def apply(self, ops: Sequence[CacheOp]) -> None:
        """Apply the ops in order; on a BackendError the ops after the failing one are not applied."""
        ...

    def state_size(self, slot: int) -> int:
        """Bytes a "stash" or "save" of `slot` would copy now (llama_state_seq_get_size): what a prompt-cache
        entry of its contents costs in RAM. Cheap: llama.cpp sizes the state without copying it."""
        ...

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        """One llama_decode over all entries, in the given (slot-ascending) order. Raises DecodeError."""
        ...

    def set_threads(self, n_threads: int) -> None:
        """Decode with this many CPU threads from the next decode on (engines sharing cores: core_share.py)."""
        ...

    def new_sampler(self, sampler_id: int, params: SamplingParams) -> None: ...

    def free_sampler(self, sampler_id: int) -> None: ...

    def sample(self, sampler_id: int, logits_index: int, params: SamplingParams) -> SampledToken:
        """Sample from the logits of batch position `logits_index` of the last decode and accept the token."""
        ...

    def prompt_logprobs(self, slot: int) -> tuple[TokenLogprob, ...]:
        """The logprobs of `slot`'s entry's logprob_targets in the last decode, in order (() if it had none).
        Computed during decode from the raw logits (log-softmax, before any sampling stage)."""
        ...

    def close(self) -> None: ...


POOLING_TYPES: tuple[str, ...] = ("mean", "cls", "last")


@dataclass(frozen=True)
class EmbedderInfo:
    """What the API needs to know about the embedding context."""

    n_embd: int  # the length of every vector
    n_ctx: int  # most tokens one input may have: an input is embedded in one decode, whole
    n_batch: int  # most tokens of all inputs in one decode
    n_seq_max: int  # most inputs in one decode
    pooling: str  # one of POOLING_TYPES: how one vector is made of an input's token states


class Embedder(Protocol):
    """A second llama.cpp context on the loaded model that computes pooled embeddings. Engine thread only."""

    @property
    def info(self) -> EmbedderInfo: ...

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        """One decode of all inputs, each its own sequence (together within n_batch tokens and n_seq_max
        inputs); each input's pooled vector, not normalized, as n_embd little-endian float32. Raises DecodeError.
        Inputs never attend to each other, so an input's vector depends on the others in the call only through
        the rounding of llama.cpp's kernels (bindings/embedder.py measures it)."""
        ...

    def close(self) -> None: ...
