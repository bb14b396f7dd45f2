"""The YAML configuration: packaged configs, overrides, validation messages."""

from pathlib import Path

import pytest
from mimo_voice.configs import CONFIG_DIR, Config, ConfigError, load_config


def test_defaults_run_the_tiny_model():
    config = load_config("default")
    assert config.model.preset == "tiny" and config.model.path is None
    assert config.server.host == "127.0.0.1" and config.server.port == 7860
    assert config.sampling_for("spoken_dialogue").text.temperature == 0.6
    assert config.sampling_for("no-such-task") == config.sampling["default"]


def test_default_yaml_states_the_schema_defaults():
    assert load_config(CONFIG_DIR / "default.yaml") == Config()


@pytest.mark.parametrize("name", ["support", "phone"])
def test_packaged_configs_validate(name):
    config = load_config(name)
    assert isinstance(config, Config)


def test_support_config_enables_the_demo_tools():
    tools = load_config("support").tools
    assert {"lookup_order", "create_ticket"} <= set(tools.enabled) and tools.support_db


def test_partial_file_merges_over_defaults(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "agent:\n  mode: thinking\nsampling:\n  spoken_dialogue:\n    text: {temperature: 0.2}\n    audio: {}\n"
    )
    config = load_config(path)
    assert config.agent.mode == "thinking"
    assert config.agent.max_new_groups == Config().agent.max_new_groups
    assert config.sampling["spoken_dialogue"].text.temperature == 0.2
    assert "asr" in config.sampling


def test_unknown_key_names_key_and_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("vad:\n  agressiveness: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "vad.agressiveness: unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_type_names_key_and_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: seven\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "server.port" in str(err.value) and str(path) in str(err.value)


def test_out_of_range_value_is_rejected(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("vad:\n  frame_ms: 25\n")
    with pytest.raises(ConfigError, match=r"vad\.frame_ms"):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_broken_yaml_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("agent: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_overrides_set_any_field():
    config = load_config(
        None,
        ["agent.mode=thinking", "server.port=9000", "tools.enabled=[calculator]", "sampling.tts.text.temperature=0.1"],
    )
    assert config.agent.mode == "thinking"
    assert config.server.port == 9000
    assert config.tools.enabled == ["calculator"]
    assert config.sampling["tts"].text.temperature == 0.1


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match=r"agent\.mode"):
        load_config(None, ["agent.mode=sleepy"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["agent.mode"])


def test_float16_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"float16 is not supported.*bfloat16"):
        load_config(None, ["model.dtype=float16"])
    assert load_config(None, ["model.dtype=bfloat16"]).model.dtype == "bfloat16"


def test_engine_section_threads_and_compile():
    config = load_config(None, ["engine.threads=1", "engine.compile=off"])
    assert config.engine.threads == 1 and config.engine.compile == "off"
    with pytest.raises(ConfigError, match=r"engine\.compile"):
        load_config(None, ["engine.compile=sometimes"])
