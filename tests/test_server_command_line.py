"""python -m llamachat_server's command line: its defaults are ServerConfig's, written down only there."""

from llamachat_server.__main__ import REPO_ROOT, config_from_args, parse_args
from llamachat_server.server_state import ServerConfig


def test_no_options_give_the_config_defaults():
    assert config_from_args(parse_args([])) == ServerConfig(module_dir=REPO_ROOT)


def test_options_reach_the_config(tmp_path):
    config = config_from_args(
        parse_args(
            [
                "--port",
                "0",
                "--response-timeout",
                "2.5",
                "--log-level",
                "debug",
                "--data-dir",
                str(tmp_path),
                "--env",
                "A=1",
                "--no-module",
            ]
        )
    )
    assert (config.port, config.response_timeout, config.log_level) == (0, 2.5, "debug")
    assert (config.data_dir, config.env_overrides, config.launch_module) == (tmp_path, {"A": "1"}, False)
