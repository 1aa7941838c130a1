"""llama.cpp RPC workers: the `rpc-worker` subcommand (worker.py) and the main process's side of --rpc (boot.py)."""
