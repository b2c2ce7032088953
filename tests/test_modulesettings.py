"""modulesettings.json against the rules the real server applies when it loads a module (docs/protocol.md §3)."""

import json

from live_server import ROOT

SERVER_VERSION = (2, 9, 6)  # the server version docs/protocol.md describes

settings = json.loads((ROOT / "modulesettings.json").read_text())
module_id, module = next(iter(settings["Modules"].items()))


def version(text):
    return tuple(int(part) for part in text.split("."))


def test_module_is_valid_for_the_server():
    assert module_id == "LlamaChat"
    assert module["Name"]
    launch = module["LaunchSettings"]
    assert launch.get("Runtime") or launch.get("Command")
    assert (ROOT / launch["FilePath"]).is_file()
    assert module["InstallOptions"]["Platforms"]
    assert module["RouteMaps"]
    assert launch["Runtime"] == "python3.11"
    assert launch["RuntimeLocation"] in ("Local", "Shared", "System")


def test_version_is_the_newest_release_and_compatible_with_the_server():
    releases = module["InstallOptions"]["ModuleReleases"]
    assert releases
    assert module["Version"] == max((r["ModuleVersion"] for r in releases), key=version)
    current = next(r for r in releases if r["ModuleVersion"] == module["Version"])
    low, high = current["ServerVersionRange"]
    assert version(low) <= SERVER_VERSION
    assert not high or SERVER_VERSION <= version(high)


def test_platforms_exclude_only_what_cannot_run_it():
    platforms = module["InstallOptions"]["Platforms"]
    assert "all" in platforms
    assert all(p == "all" or p.startswith("!") for p in platforms)


def test_chat_route_as_clients_expect_it():
    route = module["RouteMaps"][0]
    assert (route["Route"], route["Method"], route["Command"], route["MeshEnabled"]) == (
        "text/chat",
        "POST",
        "prompt",
        False,
    )
    assert module["PublishingInfo"]["Category"] == "Generative AI"  # the Explorer tab it appears on
    names = [i["Name"] for i in route["Inputs"]]
    assert names[:1] == ["prompt"]
    assert {
        "system_prompt",
        "max_tokens",
        "temperature",
        "messages",
        "top_p",
        "top_k",
        "min_p",
        "repeat_penalty",
        "seed",
        "stop",
    } <= set(names)
    outputs = {o["Name"] for o in route["Outputs"]}
    assert {
        "success",
        "reply",
        "stop_reason",
        "processMs",
        "inferenceMs",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "tokens_per_second",
        "time_to_first_token_ms",
    } <= outputs


def test_inputs_use_the_keys_the_server_binds_and_defaults_lie_in_range():
    for spec in module["RouteMaps"][0]["Inputs"]:
        assert "Default" not in spec, "the server binds DefaultValue; Default is silently ignored"
        assert spec["Type"] in ("Text", "Integer", "Float", "Boolean")
        if "MinValue" in spec:
            parse = int if spec["Type"] == "Integer" else float
            assert parse(spec["MinValue"]) <= parse(spec["DefaultValue"]) <= parse(spec["MaxValue"]), spec["Name"]


def test_environment_variables():
    env = module["EnvironmentVariables"]
    assert env["CPAI_MODULE_LLAMA_MODEL_DIR"] == "./models"
    assert env["CPAI_MODULE_LLAMA_MODEL_FILENAME"] == "mistral-7b-instruct-v0.2.Q4_K_M.gguf"
    # '@' stops the server expanding macros and turning '/' into '\' on Windows.
    assert env["CPAI_MODULE_LLAMA_MODEL_REPO"] == "@TheBloke/Mistral-7B-Instruct-v0.2-GGUF"
    assert env["CPAI_MODULE_LLAMA_MODEL_FILEGLOB"] == "*.Q4_K_M.gguf"
    assert int(env["CPAI_MODULE_LLAMA_CONTEXT_SIZE"]) == 4096
    assert {"CPAI_MODULE_LLAMA_THREADS", "CPAI_MODULE_LLAMA_GPU_LAYERS"} <= set(env)
