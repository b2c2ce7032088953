"""python -m llamachat_server: serve a CodeProject.AI module folder (LlamaChat by default) on its own.

Prints the Explorer URL once listening; Ctrl+C (or SIGTERM) stops the module and the server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from .api_keys import ApiKeyError, check_keys, read_key_file
from .app import ListenError, serve
from .cors import OriginPatternError, parse_origin_patterns
from .host_check import HostPatternError, parse_host_patterns
from .server_log import LEVELS
from .server_state import ServerConfig
from .settings import SettingsError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Printed once the server listens; tests/live_server.py waits for this line.
READY_PREFIX = "LlamaChat server ready: Explorer at "


def _env_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ServerConfig(module_dir=REPO_ROOT)  # the one place the defaults are written is ServerConfig
    parser = argparse.ArgumentParser(
        prog="python -m llamachat_server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--host",
        default=defaults.host,
        help="address to listen on (default %(default)s; any other without --api-key: a warning)",
    )
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="port to listen on, 0 for a free one (default %(default)s)"
    )
    parser.add_argument(
        "--module-dir",
        type=Path,
        default=defaults.module_dir,
        help="the module folder, holding modulesettings.json (default: this repository)",
    )
    parser.add_argument("--model", type=Path, help="a GGUF file for the module to load instead of its configured model")
    parser.add_argument(
        "--python", default=defaults.python, help="the interpreter that runs the module (default: this one)"
    )
    parser.add_argument(
        "--env",
        type=_env_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable of the module, over its settings (repeatable)",
    )
    parser.add_argument(
        "--response-timeout",
        type=float,
        default=defaults.response_timeout,
        help="seconds a client waits for the module's answer (default %(default)g)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=defaults.data_dir,
        help="where the module writes log files when it cannot reach the server "
        "(CPAI_APPROOTPATH; default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default=defaults.log_level,
        help="lowest log level shown on the console (default %(default)s)",
    )
    parser.add_argument(
        "--no-module",
        action="store_true",
        help="do not launch the module: serve only, for a module you start yourself (the module "
        "endpoints then accept any process of your user)",
    )
    parser.add_argument(
        "--poll-replies",
        action="store_true",
        help="no reply channel: follow the module's chats for OpenAI clients by status polls only (several tokens "
        "a chunk), and pass every client's status poll to the module, as CodeProject.AI Server does, instead of "
        "using the channel the launched module writes each token to",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also let web pages from ORIGIN call the server (repeatable or comma-separated; "
        "* for any, null for explore.html opened from a file, https://*.example.com); "
        "this machine's origins (localhost, 127.0.0.1, [::1]) always may",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host is NAME (repeatable or comma-separated; * in a name for any part: "
        "*.example.com): for Docker (host.docker.internal) or a reverse proxy that keeps the client's Host; "
        "loopback names and the --host address always pass",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every client request (repeatable: any of the keys); "
        "the module endpoints keep their process check",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="as --api-key, one key a line (blank lines and # comments skipped); keeps keys out of the process list",
    )
    args = parser.parse_args(argv)
    try:
        args.allow_origin = parse_origin_patterns(args.allow_origin)
    except OriginPatternError as ex:
        parser.error(f"--allow-origin: {ex}")
    try:
        args.allow_host = parse_host_patterns(args.allow_host)
    except HostPatternError as ex:
        parser.error(f"--allow-host: {ex}")
    try:
        args.api_keys = check_keys(args.api_key + [key for path in args.api_key_file for key in read_key_file(path)])
    except ApiKeyError as ex:
        parser.error(f"--api-key: {ex}")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    if args.response_timeout <= 0:
        parser.error("--response-timeout must be more than 0 seconds")
    return args


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    overrides = dict(args.env)
    if args.model is not None:
        model = args.model.resolve()
        overrides["CPAI_MODULE_LLAMA_MODEL_DIR"] = str(model.parent)
        overrides["CPAI_MODULE_LLAMA_MODEL_FILENAME"] = model.name
    return ServerConfig(
        module_dir=args.module_dir,
        host=args.host,
        port=args.port,
        python=args.python,
        env_overrides=overrides,
        response_timeout=args.response_timeout,
        data_dir=args.data_dir,
        log_level=args.log_level,
        launch_module=not args.no_module,
        reply_channel=not args.poll_replies,
        allowed_origins=args.allow_origin,
        allowed_hosts=args.allow_host,
        api_keys=args.api_keys,
    )


async def _run(config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl+C arrives as KeyboardInterrupt instead
            pass
    await serve(config, stop, lambda url: print(f"{READY_PREFIX}{url}", flush=True))


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(parse_args(argv))
    try:
        asyncio.run(_run(config))
    except SettingsError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    except ListenError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
