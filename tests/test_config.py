"""Config loading: defaults, the shipped file, overrides, and clear errors."""

from __future__ import annotations

import subprocess
import sys
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


def test_http_limits() -> None:
    assert config.Config().metrics.http == config.HttpLimits()
    cfg = config.from_mapping(
        {"metrics": {"request_deadline": "2s", "response_deadline": 5, "max_connections": 16, "workers": 2}}
    )
    assert cfg.metrics.http == config.HttpLimits(
        request_deadline_seconds=2.0, response_deadline_seconds=5.0, max_connections=16, workers=2
    )
    assert config.with_overrides(cfg, metrics="127.0.0.1:1").metrics.http == cfg.metrics.http


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
        ({"metrics": {"request_deadline": "0s"}}, "metrics.request_deadline: .*positive"),
        ({"metrics": {"workers": 0}}, "metrics.workers: must be a positive integer"),
        ({"metrics": {"max_request_bytes": "64k"}}, "metrics.max_request_bytes"),
    ],
)
def test_reliability_setting_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.from_mapping(data)


def _xentd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xentd", *args], capture_output=True, text=True, timeout=120)


def test_check_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[ingest]\n"
        'address = "tcp://127.0.0.1:5557"\n'
        "receive_hwm = 0\n"
        'adress = "x"\n'
        "[metrics]\n"
        'listen = "9650"\n'
        "[windows]\n"
        'time = ["5 minutes", "1m"]\n'
        "[models.m]\n"
        "eps = 0.9\n"
        "[engine]\n"
        'backend = "tpu"\n'
        "[log]\n"
        "level = 3\n"
    )
    out = _xentd("check-config", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == f"xentd: error: {bad}: 7 problems:"
    expected = [
        "ingest.receive_hwm: must be a positive integer, got 0",
        "ingest.adress: unknown key (did you mean 'address'?)",
        "metrics.listen: expected HOST:PORT, got '9650'",
        "windows.time[0]: '5 minutes' is not a duration",
        "models.m.eps: must be in (0, 0.5), got 0.9",
        "engine.backend: must be one of 'cpu', 'cuda', 'auto', got 'tpu'",
        "log.level: expected str, got int 3",
    ]
    assert len(lines) == 1 + len(expected)
    for line, want in zip(lines[1:], expected, strict=True):
        assert line.startswith("  ") and want in line, (line, want)


def test_every_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"ingets": {}, "state": {"dir": "/x", "interval": "1s"}})
    text = str(info.value)
    assert text.startswith("3 problems:\n")
    for key in ("ingets: unknown key", "state.dir: unknown key", "state.interval: unknown key"):
        assert key in text


def test_one_problem_stays_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"scoring": {"eps": 0.7}})
    assert str(info.value) == "scoring.eps: must be in (0, 0.5), got 0.7"


@pytest.mark.parametrize(
    "address, hint",
    [
        ("127.0.0.1:5557", "did you mean `tcp://127.0.0.1:5557`?"),
        ("localhost:5557", "did you mean `tcp://localhost:5557`?"),
        ("[::1]:5557", "did you mean `tcp://[::1]:5557`?"),
        ("*:5557", "did you mean `tcp://*:5557`?"),
        ("nonsense", ""),
        ("tcp://127.0.0.1:5557", ""),
        ("/run/xentd.sock", ""),
    ],
)
def test_transport_hint(address: str, hint: str) -> None:
    assert config.transport_hint(address) == (f" ({hint})" if hint else "")


def test_an_address_without_a_transport_gets_a_hint(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text('[ingest]\naddress = "127.0.0.1:5557"\n')
    out = _xentd("check-config", str(cfg))
    assert out.returncode == 2 and "ingest.address" in out.stderr
    assert "did you mean `tcp://127.0.0.1:5557`?" in out.stderr
    run = _xentd("run", "--ingest", "127.0.0.1:5557")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("xentd: error: --ingest: ") and "did you mean `tcp://127.0.0.1:5557`?" in run.stderr


def test_reading_config_loads_neither_the_codec_nor_numpy() -> None:
    # The CLI parses and checks config before the heavy imports; config must stay light.
    code = (
        "import sys, xentd.config\n"
        "heavy = [m for m in ('numpy', 'numba', 'zmq', 'xentd.wire') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
