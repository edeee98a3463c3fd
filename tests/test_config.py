"""The config file: precedence, validation that names the bad key, keys only from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.cli import main
from sluice.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
buffer_size = 8
[[models]]
name = "m"
  [[models.deployments]]
  base_url = "http://127.0.0.1:9001/v1/"
  api_key_env = "SLUICE_TEST_PROVIDER_KEY"
"""


@pytest.fixture
def provider_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_PROVIDER_KEY", "sk-provider")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sluice.toml"
    path.write_text(text)
    return path


def test_the_file_sets_what_flags_and_environment_do_not(tmp_path: Path, provider_key: None, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "max_streams = 7\nport = 1234\n" + MINIMAL)
    monkeypatch.setenv("SLUICE_MAX_STREAMS", "9")
    settings = load_settings(path, port=4321)
    assert settings.buffer_size == 8  # file
    assert settings.max_streams == 9  # environment over file
    assert settings.port == 4321  # flag over both
    assert settings.models[0].deployments[0].base_url == "http://127.0.0.1:9001/v1"


def test_an_unknown_or_invalid_key_is_named(tmp_path: Path, provider_key: None) -> None:
    path = write(tmp_path, MINIMAL.replace('api_key_env', 'weight = 0\n  wieght = 2\n  api_key_env'))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert f"{path}: models.0.deployments.0.weight: Input should be greater than 0" in message
    assert f"{path}: models.0.deployments.0.wieght: Extra inputs are not permitted" in message


def test_a_fallback_must_name_another_model(tmp_path: Path, provider_key: None) -> None:
    path = write(tmp_path, MINIMAL.replace('name = "m"', 'name = "m"\nfallbacks = ["nope"]'))
    with pytest.raises(ConfigError, match=r"models\[0\].fallbacks: 'nope' is not another configured model"):
        load_settings(path)


def test_a_key_variable_that_is_not_set_stops_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_TEST_PROVIDER_KEY", raising=False)
    with pytest.raises(ConfigError, match="SLUICE_TEST_PROVIDER_KEY"):
        load_settings(write(tmp_path, MINIMAL))


def test_broken_toml_and_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "models = [\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "absent.toml")


def test_the_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROVIDER_A_KEY", "PROVIDER_B_KEY", "TEAM_ALPHA_KEY", "TEAM_BETA_KEY"):
        monkeypatch.setenv(name, f"sk-{name.lower()}")
    settings = load_settings(REPO / "sluice.example.toml")
    assert [m.name for m in settings.models] == ["gpt-4o-mini", "flaky", "backup", "claude-sim"]
    claude = settings.models[-1].deployments
    assert [sorted(d.served_apis) for d in claude] == [["messages"], ["messages", "responses"]]
    assert [k.name for k in settings.keys] == ["team-alpha", "team-beta"]


def test_the_command_line_reports_config_errors_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(write(tmp_path, "buffer_size = 0\n"))]) == 2
    assert "buffer_size: Input should be greater than or equal to 1" in capsys.readouterr().err
