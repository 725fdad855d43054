"""Config loading: defaults, the shipped file, overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from xentd import config
from xentd.cli import main
from xentd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_spells_out_the_defaults() -> None:
    assert config.load(ROOT / "config" / "xentd.toml") == config.Config()


def test_defaults_bind_loopback_only() -> None:
    cfg = config.Config()
    assert cfg.ingest.address.startswith("tcp://127.0.0.1:") and cfg.metrics.host == "127.0.0.1"


def test_per_model_overrides_inherit_from_scoring() -> None:
    cfg = config.from_mapping({"scoring": {"focal_gamma": 1.0}, "models": {"fraud-v3": {"eps": 1e-15}}})
    assert cfg.scoring_for("fraud-v3") == config.ScoringConfig(eps=1e-15, focal_gamma=1.0)
    assert cfg.scoring_for("other") == config.ScoringConfig(focal_gamma=1.0)


def test_windows_and_durations() -> None:
    cfg = config.from_mapping({"windows": {"time": ["30s", "2h"], "count": [50], "ewma_half_life": 90}})
    assert [(w.label, w.seconds) for w in cfg.windows.time] == [("30s", 30.0), ("2h", 7200.0)]
    assert cfg.windows.count == (50,) and cfg.windows.ewma_half_life_seconds == 90.0


def test_cli_overrides() -> None:
    cfg = config.with_overrides(config.Config(), ingest="ipc:///tmp/x", metrics="[::1]:9999")
    assert cfg.ingest.address == "ipc:///tmp/x"
    assert (cfg.metrics.host, cfg.metrics.port) == ("::1", 9999)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"ingest": {"adress": "tcp://x:1"}}, "ingest.adress: unknown key (did you mean 'address'?)"),
        ({"ingets": {}}, "ingets: unknown key (did you mean 'ingest'?)"),
        ({"ingest": {"address": "localhost:5557"}}, "ingest.address: expected a ZeroMQ endpoint"),
        ({"ingest": {"socket": "router"}}, "ingest.socket: must be one of 'pull', 'sub'"),
        ({"ingest": {"connect": True}}, "only a SUB socket can connect"),
        ({"ingest": {"receive_hwm": True}}, "ingest.receive_hwm: expected int, got bool"),
        ({"ingest": {"receive_hwm": 0}}, "must be a positive integer"),
        ({"metrics": {"listen": "9650"}}, "metrics.listen: expected HOST:PORT"),
        ({"metrics": {"listen": "127.0.0.1:99999"}}, "outside 0..65535"),
        ({"windows": {"time": ["5 minutes"]}}, "windows.time[0]: '5 minutes' is not a duration"),
        ({"windows": {"time": ["1m", "1m"]}}, "window labels repeat"),
        ({"windows": {"count": [0]}}, "windows.count[0]: expected a positive integer"),
        ({"scoring": {"eps": 0.7}}, "scoring.eps: must be in (0, 0.5)"),
        ({"scoring": {"focal_gamma": -1}}, "scoring.focal_gamma: must be a finite number >= 0"),
        ({"models": {"bad name": {}}}, "not a valid model name"),
        ({"models": {"m": {"gamma": 1}}}, "models.m.gamma: unknown key"),
        ({"limits": {"loss_buckets": [1, 0.5]}}, "strictly increasing"),
        ({"engine": {"backend": "tpu"}}, "engine.backend: must be one of 'cpu'"),
        ({"log": {"level": "verbose"}}, "log.level: must be one of"),
        ({"ingest": "tcp://x"}, "ingest: expected a table"),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(data)
    assert message in str(info.value)


def test_load_reports_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "config" / "xentd.toml")]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[windows]\ntime = ["5 minutes"]\n')
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xentd: error: ") and "windows.time[0]" in err


def test_reliability_settings() -> None:
    cfg = config.from_mapping(
        {
            "ingest": {
                "dedup_window": 0,
                "curve": {"server_secret_key": "/k/server.key_secret", "authorized_keys": "/k/authorized"},
            },
            "metrics": {
                "listen": "0.0.0.0:9650",
                "tls": {"cert_file": "/c", "key_file": "/k"},
                "basic_auth": {"username": "prom", "password_file": "/p"},
            },
            "state": {"directory": "/var/lib/xentd", "snapshot_interval": "10s"},
        }
    )
    assert cfg.ingest.dedup_window == 0 and cfg.ingest.curve is not None
    assert cfg.metrics.tls == config.TlsConfig("/c", "/k") and cfg.metrics.basic_auth is not None
    assert cfg.state == config.StateConfig("/var/lib/xentd", 10.0)
    over = config.with_overrides(cfg, metrics="127.0.0.1:1", state_dir="/tmp/s")
    assert over.metrics.tls == cfg.metrics.tls and over.state.directory == "/tmp/s"


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"ingest": {"address": "ipc:///x", "curve": {"server_secret_key": "a", "authorized_keys": "b"}}},
            "needs a tcp:// address",
        ),
        ({"ingest": {"curve": {"server_secret_key": "a"}}}, "authorized_keys: required"),
        ({"metrics": {"tls": {"cert_file": "/c"}}}, "key_file: required"),
        ({"metrics": {"basic_auth": {"username": "a:b", "password_file": "/p"}}}, "cannot contain ':'"),
        ({"state": {"snapshot_interval": "0s"}}, "must be positive"),
        ({"ingest": {"dedup_window": -1}}, "must be >= 0"),
    ],
)
def test_reliability_setting_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.from_mapping(data)
