"""Settings: TOML file, KENSHO_* overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kensho.config import CONFIG_FILE_ENV, Settings, env_variables, load_settings
from kensho.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kensho.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment(tmp_path: Path) -> None:
    settings = load_settings(env={}, cwd=tmp_path)
    assert settings == Settings()
    assert settings.log.level == "info"
    assert settings.server.host == "127.0.0.1"


def test_file_values_are_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[log]\nlevel = "debug"\nlevels = { storage = "warning" }\n'
        '[server]\nport = 9001\n[storage]\nsources = ["/mnt/usb", "https://m.example/k"]\n',
    )
    settings = load_settings(path, env={})
    assert settings.log.level == "debug"
    assert settings.log.levels == {"storage": "warning"}
    assert settings.server.port == 9001
    assert settings.storage.sources == ["/mnt/usb", "https://m.example/k"]


def test_kensho_toml_in_working_directory_is_the_default(tmp_path: Path) -> None:
    write(tmp_path, "[server]\nport = 8123\n")
    assert load_settings(env={}, cwd=tmp_path).server.port == 8123


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9001\nhost = '0.0.0.0'\n")
    settings = load_settings(path, env={"KENSHO_SERVER_PORT": "9100"})
    assert settings.server.port == 9100
    assert settings.server.host == "0.0.0.0"


def test_environment_lists_mappings_and_aliases(tmp_path: Path) -> None:
    settings = load_settings(
        env={
            "KENSHO_STORAGE_SOURCES": "/a, /b ,",
            "KENSHO_LOG_LEVELS": "storage=DEBUG, runtime=warn",
            "KENSHO_API_KEY": "k-1234567",
        },
        cwd=tmp_path,
    )
    assert settings.storage.sources == ["/a", "/b"]
    assert settings.log.levels == {"storage": "debug", "runtime": "warning"}
    assert settings.server.api_key == "k-1234567"


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nprot = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.key == "server.prot"
    assert "unknown setting 'server.prot'" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_section_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[sever]\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.key == "sever"


def test_wrong_type_in_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nfile_backups = 'many'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.key == "log.file_backups"


def test_wrong_type_in_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"KENSHO_SERVER_PORT": "eighty"}, cwd=tmp_path)
    assert info.value.key == "server.port"
    assert str(info.value).startswith("KENSHO_SERVER_PORT: server.port:")


def test_invalid_level_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"KENSHO_LOG_LEVEL": "loud"}, cwd=tmp_path)
    assert info.value.key == "log.level"


def test_malformed_level_pairs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name=value"):
        load_settings(env={"KENSHO_LOG_LEVELS": "storage"}, cwd=tmp_path)


def test_out_of_range_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"KENSHO_SERVER_PORT": "70000"}, cwd=tmp_path)
    assert info.value.key == "server.port"


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, env={})


def test_missing_explicit_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_several_problems_are_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 'x'\nhost = 3\nzzz = 1\n")
    with pytest.raises(ConfigError, match="and 2 more problems"):
        load_settings(path, env={})


@pytest.mark.parametrize("key", ["short", "has space inside", "clé-secrète-longue"])
def test_api_key_must_be_a_usable_bearer_token(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"KENSHO_API_KEY": key}, cwd=tmp_path)
    assert info.value.key == "server.api_key"
    assert key not in str(info.value)  # the secret itself is never echoed


def test_home_in_paths_is_expanded(tmp_path: Path) -> None:
    path = write(tmp_path, '[storage]\nroot = "~/kensho-store"\n[log]\nfile = "~/k.log"\n')
    settings = load_settings(path, env={})
    assert settings.storage.root == Path.home() / "kensho-store"
    assert settings.log.file == Path.home() / "k.log"


def test_unknown_key_suggests_the_closest_setting(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"did you mean server\.port\?"):
        load_settings(path, env={})
    path = write(tmp_path, "[sever]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"did you mean server\?"):
        load_settings(path, env={})


def test_misspelt_variable_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"KENSHO_SERVR_PORT": "1"}, cwd=tmp_path)
    assert info.value.key == "KENSHO_SERVR_PORT"
    assert str(info.value) == (
        "KENSHO_SERVR_PORT: unknown variable, no setting has this name "
        "(did you mean KENSHO_SERVER_PORT?)"
    )


def test_every_unknown_variable_is_named(tmp_path: Path) -> None:
    env = {"KENSHO_LOG_LEVLES": "storage=debug", "KENSHO_ZZZ": "1", "KENSHO_SERVER_PORT": "1"}
    with pytest.raises(ConfigError) as info:
        load_settings(env=env, cwd=tmp_path)
    message = str(info.value)
    assert "KENSHO_LOG_LEVLES: unknown variable" in message
    assert "did you mean KENSHO_LOG_LEVELS?" in message
    assert "KENSHO_ZZZ: unknown variable, no setting has this name" in message
    assert "KENSHO_SERVER_PORT" not in message  # a real one is not blamed


def test_variables_outside_the_prefix_are_not_checked(tmp_path: Path) -> None:
    env = {"KENSHO": "x", "MY_KENSHO_PORT": "1", "kensho_server_prot": "1"}
    assert load_settings(env=env, cwd=tmp_path) == Settings()


def test_every_setting_and_alias_has_an_accepted_variable() -> None:
    """Derived from the models: a field added to any section is accepted at once."""
    names = env_variables()
    for section, section_field in Settings.model_fields.items():
        model = section_field.annotation
        assert model is not None
        for key in model.model_fields:
            assert names[f"KENSHO_{section.upper()}_{key.upper()}"] == f"{section}.{key}"
    assert names["KENSHO_API_KEY"] == "server.api_key"
    assert CONFIG_FILE_ENV in names


def test_config_file_variable_and_aliases_are_accepted(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text("[server]\nport = 8124\n")
    write(tmp_path, "[server]\nport = 8123\n")
    env = {
        CONFIG_FILE_ENV: str(other),
        "KENSHO_API_KEY": "k-1234567",
        "KENSHO_LOG_LEVEL": "debug",
        "KENSHO_LOG_LEVELS": "storage=warning",
    }
    settings = load_settings(env=env, cwd=tmp_path)
    assert settings.server.port == 8124  # $KENSHO_CONFIG, not ./kensho.toml
    assert settings.server.api_key == "k-1234567"
    assert settings.log.level == "debug"
    assert settings.log.levels == {"storage": "warning"}
    explicit = write(tmp_path, "[server]\nport = 8125\n")
    assert load_settings(explicit, env=env, cwd=tmp_path).server.port == 8125


def test_missing_file_named_by_the_config_variable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env={CONFIG_FILE_ENV: "missing.toml"}, cwd=tmp_path)
