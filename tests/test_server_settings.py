"""How llamachat_server reads modulesettings (docs/protocol.md §3) and builds the module's environment (§1.1)."""

import json

import pytest

from live_server import ROOT
from llamachat_server.routes import Route, RouteMap
from llamachat_server.settings import HostPlatform, SettingsError, load_module_settings, merge_layer, module_environment

LINUX = HostPlatform("linux", "x64")
WINDOWS = HostPlatform("windows", "x64")

BASE_SETTINGS = """{
  // comments are allowed, as in the real server's .NET configuration files
  "Modules": {
    "Demo": {
      "Name": "Demo Module",
      "Version": "0.1.0",
      "LaunchSettings": { "FilePath": "demo.py", "Runtime": "python3.11", "Parallelism": 2 },
      "GpuOptions": { "InstallGPU": false, "EnableGPU": true },
      "EnvironmentVariables": {
        "demo_dir": "%CURRENT_MODULE_PATH%/models",
        "DEMO_REPO": "@org/name",
        "DEMO_URL": "https://example.invalid/a/b",
        "CPAI_LOG_VERBOSITY": "Info"
      },
      "InstallOptions": { "ModuleReleases": [ { "ModuleVersion": "1.2.0" }, { "ModuleVersion": "1.10.0" } ] },
      "RouteMaps": [
        { "Route": "demo/run", "Method": "POST", "Command": "run" },
        { "Route": "demo/other", "Method": "POST", "Command": "other" }
      ]
    }
  }
}"""


@pytest.fixture
def module_dir(tmp_path):
    (tmp_path / "modulesettings.json").write_text(BASE_SETTINGS)
    (tmp_path / "demo.py").write_text("")
    return tmp_path


def test_os_layers_override_key_by_key_and_array_items_by_index(module_dir):
    # Lower-case keys in the layer still override (.NET configuration keys ignore case).
    (module_dir / "modulesettings.linux.json").write_text(
        json.dumps(
            {"Modules": {"Demo": {"launchsettings": {"parallelism": 1}, "RouteMaps": [{"Route": "demo/linux"}]}}}
        )
    )
    (module_dir / "modulesettings.windows.json").write_text(json.dumps({"Modules": {"Demo": {"Name": "Windows"}}}))

    linux = load_module_settings(module_dir, LINUX)
    assert linux.name == "Demo Module"
    assert linux.parallelism == 1
    assert linux.get("LaunchSettings", "Runtime") == "python3.11"  # untouched keys stay
    assert [(r["Route"], r["Command"]) for r in linux.route_maps] == [("demo/linux", "run"), ("demo/other", "other")]
    assert load_module_settings(module_dir, WINDOWS).name == "Windows"


def test_layer_order_follows_the_real_server():
    host = HostPlatform("linux", "arm64", docker=True, device="jetson")
    assert host.layer_filenames() == [
        "modulesettings.json",
        "modulesettings.development.json",
        "modulesettings.linux.json",
        "modulesettings.linux.development.json",
        "modulesettings.linux.arm64.json",
        "modulesettings.linux.arm64.development.json",
        "modulesettings.docker.json",
        "modulesettings.docker.development.json",
        "modulesettings.jetson.json",
        "modulesettings.jetson.development.json",
    ]
    assert merge_layer({"A": [1, 2, 3], "B": {"C": 1}}, {"a": [9], "b": {"D": 2}}) == {
        "A": [9, 2, 3],
        "B": {"C": 1, "D": 2},
    }


def test_derived_values(module_dir):
    settings = load_module_settings(module_dir, LINUX)
    assert settings.module_id == "Demo"
    assert settings.version == "1.10.0"  # the newest ModuleRelease, compared as numbers
    assert settings.queue == "demo_queue"  # default: <moduleid>_queue, lower case
    assert settings.enable_gpu is False  # InstallGPU false wins over EnableGPU
    assert settings.log_verbosity == "Quiet"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "has no modulesettings.json"),
        ("{ not json", "is not valid JSON"),
        ('{"Modules": {}}', "has no module under 'Modules'"),
        ('{"Modules": {"X": {"RouteMaps": [{"Route": "a"}]}}}', "LaunchSettings.FilePath"),
        ('{"Modules": {"X": {"LaunchSettings": {"FilePath": "missing.py"}, "RouteMaps": [{}]}}}', "does not exist"),
        ('{"Modules": {"X": {"LaunchSettings": {"FilePath": "demo.py"}}}}', "RouteMaps is empty"),
    ],
)
def test_unusable_settings_say_what_to_fix(tmp_path, content, message):
    (tmp_path / "demo.py").write_text("")
    if content is not None:
        (tmp_path / "modulesettings.json").write_text(content)
    with pytest.raises(SettingsError, match=message):
        load_module_settings(tmp_path, LINUX)


def test_module_environment_layers_like_the_real_server(module_dir, tmp_path):
    settings = load_module_settings(module_dir, LINUX)
    env = module_environment(
        settings,
        port=4321,
        python="/py/bin/python",
        data_dir=tmp_path / "data",
        base_env={"PATH": "/bin", "CPAI_MODULE_ID": "inherited"},
        overrides={"DEMO_REPO": "override"},
        host=LINUX,
    )
    assert env["PATH"] == "/bin"  # the server's own environment is inherited
    assert env["CPAI_PORT"] == "4321"
    assert env["CPAI_APPROOTPATH"] == str(tmp_path / "data")
    assert env["DEMO_DIR"] == f"{module_dir.resolve()}/models"  # keys upper-cased, macros expanded
    assert env["DEMO_URL"] == "https://example.invalid/a/b"
    assert env["DEMO_REPO"] == "override"  # overrides come last
    assert env["CPAI_LOG_VERBOSITY"] == "Info"  # the module's own value beats the server default
    assert env["CPAI_MODULE_ID"] == "Demo"  # the server's values beat the inherited environment
    assert env["CPAI_MODULE_NAME"] == "Demo Module"
    assert env["CPAI_MODULE_PATH"] == str(module_dir.resolve())
    assert env["CPAI_MODULE_QUEUENAME"] == "demo_queue"
    assert env["CPAI_MODULE_SERVER_LAUNCHED"] == "true"
    assert env["CPAI_MODULE_PARALLELISM"] == "2"
    assert env["CPAI_MODULE_ENABLE_GPU"] == "False"


def test_at_sign_keeps_a_value_verbatim_and_slashes_turn_on_windows(module_dir):
    settings = load_module_settings(module_dir, WINDOWS)
    env = module_environment(settings, port=1, python="py", data_dir=module_dir, base_env={}, host=WINDOWS)
    assert env["DEMO_REPO"] == "org/name"  # '@' stripped, slash kept
    assert env["DEMO_DIR"].endswith("\\models")
    assert "/" not in env["DEMO_DIR"]
    assert env["DEMO_URL"] == "https://example.invalid/a/b"  # URLs keep their slashes


def test_llamachat_settings_give_the_documented_environment(tmp_path):
    settings = load_module_settings(ROOT, LINUX)
    env = module_environment(settings, port=5000, python="py", data_dir=tmp_path, base_env={}, host=LINUX)
    assert env["CPAI_MODULE_ID"] == "LlamaChat"
    assert env["CPAI_MODULE_QUEUENAME"] == "llamachat_queue"
    assert env["CPAI_MODULE_LLAMA_MODEL_REPO"] == "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"
    assert env["CPAI_MODULE_LLAMA_MODEL_DIR"] == "./models"
    assert env["CPAI_MODULE_PARALLELISM"] == "1"
    assert env["CPAI_MODULE_ENABLE_GPU"] == "True"


def test_routes_match_case_insensitively_by_longest_prefix_with_the_rest_as_segments(module_dir):
    routes = RouteMap()
    routes.register_module(load_module_settings(module_dir, LINUX))
    match = routes.match("POST", "/DEMO/Run/A/b/")
    assert (match.route.command, match.route.queue, match.url_segments) == ("run", "demo_queue", ["A", "b"])
    assert routes.match("POST", "demo/runner") is None  # only at a '/' boundary
    assert routes.match("GET", "demo/run") is None
    assert routes.match("POST", "Demo/get_command_status").route.command == "get_command_status"
    assert routes.match("POST", "demo/cancel_command").route.command == "cancel_command"
    routes.register_module(load_module_settings(module_dir, LINUX))  # registering again changes nothing
    assert len(routes.routes()) == 4
    routes.register(Route("demo", "POST", "demo_queue", "base", "Demo"))
    assert routes.match("POST", "demo/run/x").route.command == "run"  # the longest route wins
    assert routes.match("POST", "demo/x").url_segments == ["x"]
