"""`python -m server`: settings from flags and environment, then the HTTP server."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from registry.models import RegistryError
from server.settings import Settings, SettingsError, exposure_error, load_settings, profile_error

# In-flight requests get this long to finish on SIGTERM/Ctrl-C; then the engine fails what is left.
GRACEFUL_SHUTDOWN_S = 5
GIL_SWITCH_INTERVAL_S = 0.0005  # see main(): how long a thread back from llama.cpp may wait for the GIL


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# `python -m server NAME ...`: tools that read the same settings but do not serve (module:function, imported
# only when asked for, so serving never pays for them).
SUBCOMMANDS = {
    "audit": "server.audit.cli:main",  # verify / export the audit log
    "keys": "server.auth.cli:main",  # add / list / revoke named API keys
    "rpc-worker": "server.rpc.worker:main",  # serve this machine's devices over llama.cpp's RPC backend
}


def run_subcommand(name: str, argv: list[str]) -> int:
    import importlib

    module_name, _, function_name = SUBCOMMANDS[name].partition(":")
    function: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function_name)
    return function(argv)


def _locate(settings: Settings) -> bool:
    """Fail fast, before binding the port, on a model that can never resolve (False, after one line); a model
    that only has to be downloaded downloads in the loader, with the port bound and /health reporting it."""
    from server.boot.loader import locate_settings_model

    try:
        name, model = locate_settings_model(settings)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    if model is None:
        logging.getLogger("server").info("model %s is not downloaded yet: it downloads now, /health says how far", name)
    else:
        logging.getLogger("server").info("model %s: %s", model.name, model.path)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # before loading or downloading anything, before binding the port
    refusal = exposure_error(settings) or profile_error(settings)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if settings.rpc:  # a --rpc worker that does not answer would abort the process inside ggml-rpc: one line
        from server.rpc.boot import worker_error

        if (rpc_refusal := worker_error(settings)) is not None:
            print(f"error: {rpc_refusal}", file=sys.stderr)
            return 2
    configure_logging(settings)
    # A thread waiting for the GIL gets it when the holder blocks or after this interval. An engine thread back
    # from llama_decode (C code, GIL released) waits behind the event loop's or another engine's Python work,
    # its cores idle meanwhile: CPython's 5 ms default is a sixth of a 30 ms step.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    import uvicorn

    from server.app import create_app
    from server.fleet.spec import FleetConfigError, model_specs

    try:
        specs = model_specs(settings)
    except FleetConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for spec in specs:
        if not _locate(spec.settings):
            return 1
    load_errors: list[str] = []
    server: uvicorn.Server | None = None

    def stop_on_load_failure(message: str) -> None:
        load_errors.append(message)
        if server is not None:
            server.should_exit = True  # like llama-server: a model that cannot load ends the process

    app = create_app(settings, on_load_failure=stop_on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    server.run()
    if load_errors:
        print(f"error: the model failed to load: {load_errors[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
