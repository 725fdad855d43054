"""Configuration: TOML in, frozen dataclasses out.

Every tunable of the daemon lives here. Every field has a default, so the daemon
runs with no file at all. Loading is strict: an unknown key, a wrong type or an
out-of-range value is a :class:`~xentd.errors.ConfigError` that names the key,
because a typo in a monitoring config otherwise fails silently for months.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar, cast

from xentd.errors import ConfigError
from xentd.names import MODEL_NAME_RE

T = TypeVar("T")

MiB = 1 << 20


@dataclass(frozen=True)
class CurveConfig:
    """CURVE encryption and client authentication for a tcp ingest socket."""

    # The server's secret key file (from `xentd keygen`); its public half goes to producers.
    server_secret_key: str
    # A directory of client public key files; only these clients may connect.
    authorized_keys: str


@dataclass(frozen=True)
class IngestConfig:
    """The ZeroMQ socket batches arrive on."""

    address: str = "tcp://127.0.0.1:5557"
    socket: Literal["pull", "sub"] = "pull"
    # SUB only: connect to the publishers' address instead of binding it.
    connect: bool = False
    # SUB only: topic prefixes; the topic frame is the model name.
    subscribe: tuple[str, ...] = ("",)
    receive_hwm: int = 1000
    max_message_bytes: int = 256 * MiB
    max_header_bytes: int = 64 * 1024
    # Recent (model, batch_id) pairs remembered; a batch whose pair is among them
    # is a retry, counted in xentd_duplicate_batches_total and not scored. 0: off.
    dedup_window: int = 65536
    curve: CurveConfig | None = None


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str
    key_file: str
    # When set, clients must present a certificate signed by this CA (mutual TLS).
    client_ca_file: str | None = None


@dataclass(frozen=True)
class BasicAuthConfig:
    username: str
    # A file holding the password (trailing newline ignored); the same file can
    # serve Prometheus's scrape_config `basic_auth.password_file`.
    password_file: str


@dataclass(frozen=True)
class HttpLimits:
    """What the metrics HTTP server lets one client hold (docs/metrics.md, "HTTP limits")."""

    # The TLS handshake, headers and body must all arrive within this long of the accept.
    request_deadline_seconds: float = 10.0
    # A client must take the whole response within this long of its first byte.
    response_deadline_seconds: float = 30.0
    # Connections still sending their request; one more closes the longest-sending one.
    max_connections: int = 256
    # Threads answering complete requests (rendering holds the GIL, so more would not help).
    workers: int = 4
    # Complete requests waiting for a worker; beyond it, 503 at once.
    max_queued_requests: int = 32
    # The kernel's accept queue (capped by net.core.somaxconn).
    listen_backlog: int = 256
    # Request line, headers and body together; larger gets 413.
    max_request_bytes: int = 64 * 1024


@dataclass(frozen=True)
class MetricsConfig:
    """The HTTP endpoint Prometheus scrapes."""

    host: str = "127.0.0.1"
    port: int = 9650
    tls: TlsConfig | None = None
    basic_auth: BasicAuthConfig | None = None
    http: HttpLimits = field(default_factory=HttpLimits)


@dataclass(frozen=True)
class TimeWindow:
    label: str
    seconds: float


@dataclass(frozen=True)
class WindowsConfig:
    """Rolling statistics kept per model."""

    time: tuple[TimeWindow, ...] = (
        TimeWindow("1m", 60.0),
        TimeWindow("5m", 300.0),
        TimeWindow("1h", 3600.0),
    )
    # A time window is a ring of this many buckets, so its edge is exact to
    # seconds / buckets.
    buckets: int = 60
    count: tuple[int, ...] = (1000, 10000)
    ewma_half_life_seconds: float = 300.0


# Reaches past -log(eps) for float64 (36.04), the largest loss that clipped
# probabilities can produce; logits are unclipped and land in the top buckets.
DEFAULT_LOSS_BUCKETS: tuple[float, ...] = (
    0.001,
    0.01,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    40.0,
    100.0,
)


@dataclass(frozen=True)
class ScoringConfig:
    """How losses are computed. The top-level table sets defaults; ``[models.NAME]`` overrides them."""

    # None: the machine epsilon of the predictions' datatype, as sklearn's log_loss.
    eps: float | None = None
    focal_gamma: float = 2.0
    # None: sqrt(machine epsilon of the predictions' datatype), sklearn's warning threshold.
    normalization_tolerance: float | None = None
    # Per model only ([models.NAME]): "cpu", "cuda" or "auto"; None: engine.backend.
    backend: str | None = None


@dataclass(frozen=True)
class LimitsConfig:
    max_models: int = 1000
    # Classes 0..class_limit-1 get their own series and window slots; the rest share "other".
    class_limit: int = 100
    loss_buckets: tuple[float, ...] = DEFAULT_LOSS_BUCKETS
    # When either is set, a new model must be listed or match the pattern (fullmatch).
    allowed_models: tuple[str, ...] = ()
    model_pattern: str | None = None
    # A model with no batch for this long is dropped, and its series leave /metrics. None: never.
    model_ttl_seconds: float | None = 86400.0

    def admits(self, model: str) -> bool:
        if not self.allowed_models and self.model_pattern is None:
            return True
        return model in self.allowed_models or (
            self.model_pattern is not None and re.fullmatch(self.model_pattern, model) is not None
        )


@dataclass(frozen=True)
class StateConfig:
    """Snapshots of the rolling state, so restarts lose nothing."""

    # None: keep state in memory only.
    directory: str | None = None
    snapshot_interval_seconds: float = 30.0


@dataclass(frozen=True)
class EngineConfig:
    # "cpu", "cuda" (fails at start without a GPU) or "auto" (CUDA for big batches when a GPU is there).
    backend: Literal["cpu", "cuda", "auto"] = "cpu"
    # With "auto": batches with at least this many prediction values go to the GPU.
    cuda_min_elements: int = 1 << 20
    cuda_threads_per_block: int = 256
    # Batches with at least this many prediction elements use the multi-threaded kernels.
    # Below this many prediction values the serial kernels run: on 2 cores a drain of 16,384 x 10
    # rows scored in 940 us serial against 1,981 us with the thread pool (BENCHMARKS.md section b).
    parallel_threshold: int = 1 << 20
    # Most messages taken off the socket per loop turn.
    drain_max: int = 256
    # Within one turn, a model's batches of at most this many prediction values
    # are concatenated and scored in one kernel call (per-message overhead dominates them).
    group_max_elements: int = 1 << 16
    # On SIGTERM, how long to keep scoring messages already queued in the socket.
    shutdown_drain_seconds: float = 5.0


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    # At most one log line per rejection reason per this many seconds.
    rejection_interval_seconds: float = 10.0


@dataclass(frozen=True)
class ExportConfig:
    """Which series /metrics carries (docs/metrics.md, "Cardinality")."""

    # Per-class series (xentd_class_cross_entropy_nats): "all", "none", or "auto": only for
    # models with at most per_class_max_classes classes. 10,000 models x 101 classes is ~2 M series.
    per_class: Literal["auto", "all", "none"] = "auto"
    per_class_max_classes: int = 20
    # Most per-model series in one scrape; past it, per-class series go first, then whole
    # models in name order (counted in xentd_series_dropped). 0: no budget.
    max_series: int = 1_000_000


# Label delays from 1 s to 30 days (xentd_label_delay_seconds).
DEFAULT_DELAY_BUCKETS: tuple[float, ...] = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 10800.0, 21600.0)
DEFAULT_DELAY_BUCKETS += (43200.0, 86400.0, 259200.0, 604800.0, 2592000.0)


@dataclass(frozen=True)
class LabelsConfig:
    """Delayed labels: predictions that wait for labels sent later (docs/protocol.md)."""

    # A waiting prediction older than this is dropped and counted as expired.
    ttl_seconds: float = 3600.0
    # The join store's budget across all models; past it the oldest predictions are evicted.
    max_pending_bytes: int = 256 * 1024 * 1024
    delay_buckets: tuple[float, ...] = DEFAULT_DELAY_BUCKETS


@dataclass(frozen=True)
class CalibrationConfig:
    """Reliability bins of every model (docs/metrics.md, "Calibration and normalized entropy")."""

    # Equal-width confidence bins over [0, 1]; each costs a model 3 sums in every window bucket.
    bins: int = 15


# More bins than this is a series budget and a memory problem, not a finer diagram.
MAX_CALIBRATION_BINS = 100


# Stamps in the join store are 10 ms ticks in 32 bits: 497 days; a TTL must leave room.
MAX_LABEL_TTL_SECONDS = 400 * 86400.0


@dataclass(frozen=True)
class Config:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    models: Mapping[str, ScoringConfig] = field(default_factory=lambda: MappingProxyType({}))
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    state: StateConfig = field(default_factory=StateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def scoring_for(self, model: str) -> ScoringConfig:
        return self.models.get(model, self.scoring)

    def model_backends(self) -> dict[str, str]:
        return {name: m.backend for name, m in self.models.items() if m.backend is not None}


# --- parsing -----------------------------------------------------------------

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, where: str) -> float:
    """Parse ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"``, ``"1d"`` into seconds."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise ConfigError(f'{where}: {text!r} is not a duration; write e.g. "30s", "5m" or "1h"')
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{where}: a duration must be positive, got {text!r}")
    return seconds


def parse_listen(text: str, where: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{where}: expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} is outside 0..65535")
    return host.strip("[]"), port


_ENDPOINT_RE = re.compile(r"^(tcp|ipc|inproc)://.+")
# HOST:PORT, [IPv6]:PORT or *:PORT written without the transport in front.
_BARE_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):(\d+|\*)$")


def transport_hint(address: str) -> str:
    """`` (did you mean `tcp://HOST:PORT`?)`` for an address written as HOST:PORT, else ``""``.

    The one place that guesses what a transport-less address meant: the config's
    ``ingest.address``, ``--ingest``, ``send``/``replay --to`` and :class:`~xentd.client.Publisher`
    all use it, so they all say the same thing.
    """
    text = address.strip()
    if "://" not in text and _BARE_HOST_PORT_RE.match(text):
        return f" (did you mean `tcp://{text}`?)"
    return ""


def _endpoint_problem(address: str, where: str) -> str | None:
    """What is wrong with ``address`` as the daemon's ingest endpoint, or None."""
    if _ENDPOINT_RE.match(address):
        return None
    return (
        f"{where}: expected a ZeroMQ endpoint such as "
        f'"tcp://127.0.0.1:5557" or "ipc:///run/xentd/ingest", got {address!r}{transport_hint(address)}'
    )


class _Table:
    """A TOML table being consumed key by key, so leftovers can be reported as unknown.

    Problems are noted in ``errors`` (shared by a table and its sub-tables) rather
    than raised, and the parse goes on with the default, so one run reports every
    problem in the file; :func:`from_mapping` raises them together at the end.
    """

    def __init__(self, data: Any, path: str, errors: list[str] | None = None) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'}: expected a table, got {type(data).__name__}")
        self._data = dict(data)
        self._path = path
        self.errors: list[str] = [] if errors is None else errors

    def where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, message: str) -> None:
        self.errors.append(message)

    def guard(self, parse: Callable[[], T], default: T) -> T:
        """``parse()``, or ``default`` with its :class:`ConfigError` noted, so parsing goes on."""
        try:
            return parse()
        except ConfigError as exc:
            self.errors.append(str(exc))
            return default

    def take(self, key: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        if key not in self._data:
            return default
        value = self._data.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a config that says `port = true` is a mistake.
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.error(f"{self.where(key)}: expected {names}, got {type(value).__name__} {value!r}")
            return default
        return cast(T, value)

    def take_table(self, key: str) -> _Table:
        """The sub-table ``key``; raises :class:`ConfigError` when it is not a table."""
        return _Table(self._data.pop(key, {}), self.where(key), self.errors)

    def keys(self) -> list[str]:
        return list(self._data)

    def done(self, known: Callable[[], list[str]] | list[str]) -> None:
        if not self._data:
            return
        names = known() if callable(known) else known
        allowed = ", ".join(sorted(names))
        for key in self._data:
            hint = difflib.get_close_matches(key, names, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.error(f"{self.where(key)}: unknown key{suggestion}; known keys here: {allowed}")
        self._data.clear()

    def raise_errors(self) -> None:
        if len(self.errors) == 1:
            raise ConfigError(self.errors[0])
        if self.errors:
            raise ConfigError(f"{len(self.errors)} problems:\n" + "\n".join(f"  {e}" for e in self.errors))


def _non_negative_int(t: _Table, key: str, default: int) -> int:
    value = t.take(key, int, default)
    if value < 0:
        t.error(f"{t.where(key)}: must be >= 0, got {value}")
        return default
    return value


def _positive_int(t: _Table, key: str, default: int) -> int:
    value = t.take(key, int, default)
    if value <= 0:
        t.error(f"{t.where(key)}: must be a positive integer, got {value}")
        return default
    return value


def _choice(t: _Table, key: str, choices: tuple[str, ...], default: str) -> str:
    value = t.take(key, str, default)
    if value not in choices:
        t.error(f"{t.where(key)}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return default
    return value


def _duration(t: _Table, key: str, default: float) -> float:
    value = t.take(key, (str, int, float), default)
    return t.guard(lambda: _seconds(value, t.where(key)), default)


def _seconds(value: str | float, where: str) -> float:
    if isinstance(value, str):
        return parse_duration(value, where)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: must be a positive number of seconds, got {value}")
    return float(value)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _parse_ingest(t: _Table) -> IngestConfig:
    d = IngestConfig()
    address = t.take("address", str, d.address)
    problem = _endpoint_problem(address, t.where("address"))
    if problem is not None:
        t.error(problem)
        address = d.address
    subscribe = t.take("subscribe", list, list(d.subscribe))
    if not all(isinstance(s, str) for s in subscribe):
        t.error(f"{t.where('subscribe')}: expected a list of topic prefix strings")
        subscribe = list(d.subscribe)
    curve = t.guard(lambda: _parse_curve(t.take_table("curve")), None) if "curve" in t.keys() else None
    cfg = IngestConfig(
        address=address,
        socket=_choice(t, "socket", ("pull", "sub"), d.socket),  # type: ignore[arg-type]
        connect=t.take("connect", bool, d.connect),
        subscribe=tuple(subscribe),
        receive_hwm=_positive_int(t, "receive_hwm", d.receive_hwm),
        max_message_bytes=_positive_int(t, "max_message_bytes", d.max_message_bytes),
        max_header_bytes=_positive_int(t, "max_header_bytes", d.max_header_bytes),
        dedup_window=_non_negative_int(t, "dedup_window", d.dedup_window),
        curve=curve,
    )
    if cfg.connect and cfg.socket != "sub":
        t.error(f"{t.where('connect')}: only a SUB socket can connect; a PULL socket binds")
    if cfg.curve is not None and not address.startswith("tcp://"):
        t.error(
            f"{t.where('curve')}: CURVE authentication needs a tcp:// address, got {address!r} "
            "(ipc sockets are guarded by file permissions instead)"
        )
    t.done(_field_names(IngestConfig))
    return cfg


def _required_str(t: _Table, key: str) -> str:
    value = t.take(key, str, "")
    if not value:
        t.error(f"{t.where(key)}: required, as a non-empty string")
    return value


def _parse_curve(t: _Table) -> CurveConfig:
    cfg = CurveConfig(
        server_secret_key=_required_str(t, "server_secret_key"), authorized_keys=_required_str(t, "authorized_keys")
    )
    t.done(_field_names(CurveConfig))
    return cfg


def _parse_tls(t: _Table) -> TlsConfig:
    ca = t.take("client_ca_file", str, "")
    cfg = TlsConfig(
        cert_file=_required_str(t, "cert_file"), key_file=_required_str(t, "key_file"), client_ca_file=ca or None
    )
    t.done(_field_names(TlsConfig))
    return cfg


def _parse_basic_auth(t: _Table) -> BasicAuthConfig:
    cfg = BasicAuthConfig(username=_required_str(t, "username"), password_file=_required_str(t, "password_file"))
    if ":" in cfg.username:
        t.error(f"{t.where('username')}: a basic-auth username cannot contain ':'")
    t.done(_field_names(BasicAuthConfig))
    return cfg


def _parse_metrics(t: _Table) -> MetricsConfig:
    d = MetricsConfig()
    listen = t.take("listen", str, f"{d.host}:{d.port}")
    host, port = t.guard(lambda: parse_listen(listen, t.where("listen")), (d.host, d.port))
    tls = t.guard(lambda: _parse_tls(t.take_table("tls")), None) if "tls" in t.keys() else None
    auth = t.guard(lambda: _parse_basic_auth(t.take_table("basic_auth")), None) if "basic_auth" in t.keys() else None
    h = HttpLimits()
    http = HttpLimits(
        request_deadline_seconds=_duration(t, "request_deadline", h.request_deadline_seconds),
        response_deadline_seconds=_duration(t, "response_deadline", h.response_deadline_seconds),
        max_connections=_positive_int(t, "max_connections", h.max_connections),
        workers=_positive_int(t, "workers", h.workers),
        max_queued_requests=_positive_int(t, "max_queued_requests", h.max_queued_requests),
        listen_backlog=_positive_int(t, "listen_backlog", h.listen_backlog),
        max_request_bytes=_positive_int(t, "max_request_bytes", h.max_request_bytes),
    )
    t.done(["listen", "tls", "basic_auth", *_HTTP_KEYS])
    return MetricsConfig(host=host, port=port, tls=tls, basic_auth=auth, http=http)


_HTTP_KEYS = (
    "request_deadline",
    "response_deadline",
    "max_connections",
    "workers",
    "max_queued_requests",
    "listen_backlog",
    "max_request_bytes",
)


_WINDOW_LABEL_RE = re.compile(r"^[A-Za-z0-9_.]+$")


def _parse_windows(t: _Table) -> WindowsConfig:
    d = WindowsConfig()
    time_specs = t.take("time", list, [w.label for w in d.time])
    windows: list[TimeWindow] = []
    for i, spec in enumerate(time_specs):
        where = f"{t.where('time')}[{i}]"
        if not isinstance(spec, str):
            t.error(f'{where}: expected a duration string such as "5m", got {spec!r}')
            continue
        seconds = t.guard(functools.partial(parse_duration, spec, where), 0.0)
        if seconds:
            windows.append(TimeWindow(spec.strip(), seconds))
    counts = t.take("count", list, list(d.count))
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            t.error(f"{t.where('count')}[{i}]: expected a positive integer, got {n!r}")
    counts = [n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    labels = [w.label for w in windows] + [f"last_{n}" for n in counts] + ["ewma"]
    if len(set(labels)) != len(labels):
        t.error(f"{t.where('time')}/{t.where('count')}: window labels repeat: {labels}")
    cfg = WindowsConfig(
        time=tuple(windows),
        buckets=_positive_int(t, "buckets", d.buckets),
        count=tuple(counts),
        ewma_half_life_seconds=_duration(t, "ewma_half_life", d.ewma_half_life_seconds),
    )
    t.done(["time", "buckets", "count", "ewma_half_life"])
    return cfg


def _parse_scoring(t: _Table, base: ScoringConfig, *, per_model: bool = False) -> ScoringConfig:
    eps = t.take("eps", (int, float), base.eps)
    if eps is not None and not (0.0 < eps < 0.5):
        t.error(f"{t.where('eps')}: must be in (0, 0.5), got {eps}")
        eps = base.eps
    gamma = float(t.take("focal_gamma", (int, float), base.focal_gamma))
    if not math.isfinite(gamma) or gamma < 0:
        t.error(f"{t.where('focal_gamma')}: must be a finite number >= 0, got {gamma}")
        gamma = base.focal_gamma
    tol = t.take("normalization_tolerance", (int, float), base.normalization_tolerance)
    if tol is not None and not (0.0 < tol < 1.0):
        t.error(f"{t.where('normalization_tolerance')}: must be in (0, 1), got {tol}")
        tol = base.normalization_tolerance
    backend = _choice(t, "backend", ("cpu", "cuda", "auto"), "") if per_model and "backend" in t.keys() else None
    t.done(_field_names(ScoringConfig) if per_model else [f for f in _field_names(ScoringConfig) if f != "backend"])
    return ScoringConfig(
        eps=None if eps is None else float(eps),
        focal_gamma=gamma,
        normalization_tolerance=None if tol is None else float(tol),
        backend=backend or None,
    )


def _parse_limits(t: _Table) -> LimitsConfig:
    d = LimitsConfig()
    buckets = t.take("loss_buckets", list, list(d.loss_buckets))
    if (
        not buckets
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in buckets)
        or any(not math.isfinite(b) or b <= 0 for b in buckets)
        or any(b2 <= b1 for b1, b2 in zip(buckets, buckets[1:], strict=False))
    ):
        t.error(
            f"{t.where('loss_buckets')}: expected a non-empty, strictly increasing "
            f"list of positive finite numbers, got {buckets!r}"
        )
        buckets = list(d.loss_buckets)
    allowed = t.take("allowed_models", list, list(d.allowed_models))
    for i, name in enumerate(allowed):
        if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
            t.error(f"{t.where('allowed_models')}[{i}]: {name!r} is not a valid model name")
    pattern = t.take("model_pattern", str, "") or None
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            t.error(f"{t.where('model_pattern')}: not a regular expression: {exc}")
            pattern = None
    ttl_value = t.take("model_ttl", (str, int, float), "24h")
    ttl = (
        None
        if ttl_value == "never"
        else t.guard(lambda: _seconds(ttl_value, t.where("model_ttl")), d.model_ttl_seconds)
    )
    cfg = LimitsConfig(
        max_models=_positive_int(t, "max_models", d.max_models),
        class_limit=_positive_int(t, "class_limit", d.class_limit),
        loss_buckets=tuple(float(b) for b in buckets),
        allowed_models=tuple(a for a in allowed if isinstance(a, str)),
        model_pattern=pattern,
        model_ttl_seconds=ttl,
    )
    t.done(["max_models", "class_limit", "loss_buckets", "allowed_models", "model_pattern", "model_ttl"])
    return cfg


def _parse_state(t: _Table) -> StateConfig:
    d = StateConfig()
    directory = t.take("directory", str, "")
    cfg = StateConfig(
        directory=directory or None,
        snapshot_interval_seconds=_duration(t, "snapshot_interval", d.snapshot_interval_seconds),
    )
    t.done(["directory", "snapshot_interval"])
    return cfg


def _parse_engine(t: _Table) -> EngineConfig:
    d = EngineConfig()
    parallel_threshold = _non_negative_int(t, "parallel_threshold", d.parallel_threshold)
    threads = _positive_int(t, "cuda_threads_per_block", d.cuda_threads_per_block)
    if threads & (threads - 1) or threads > 1024:
        t.error(f"{t.where('cuda_threads_per_block')}: must be a power of two up to 1024, got {threads}")
        threads = d.cuda_threads_per_block
    group_max_elements = t.take("group_max_elements", int, d.group_max_elements)
    if group_max_elements < 0:
        t.error(f"{t.where('group_max_elements')}: must be >= 0 (0 disables grouping)")
        group_max_elements = d.group_max_elements
    cfg = EngineConfig(
        backend=_choice(t, "backend", ("cpu", "cuda", "auto"), d.backend),  # type: ignore[arg-type]
        cuda_min_elements=_non_negative_int(t, "cuda_min_elements", d.cuda_min_elements),
        cuda_threads_per_block=threads,
        parallel_threshold=parallel_threshold,
        drain_max=_positive_int(t, "drain_max", d.drain_max),
        group_max_elements=group_max_elements,
        shutdown_drain_seconds=_duration(t, "shutdown_drain", d.shutdown_drain_seconds),
    )
    t.done(
        [
            "backend",
            "cuda_min_elements",
            "cuda_threads_per_block",
            "parallel_threshold",
            "drain_max",
            "group_max_elements",
            "shutdown_drain",
        ]
    )
    return cfg


def _parse_log(t: _Table) -> LogConfig:
    d = LogConfig()
    cfg = LogConfig(
        level=_choice(t, "level", ("debug", "info", "warning", "error"), d.level),  # type: ignore[arg-type]
        rejection_interval_seconds=_duration(t, "rejection_interval", d.rejection_interval_seconds),
    )
    t.done(["level", "rejection_interval"])
    return cfg


def _parse_export(t: _Table) -> ExportConfig:
    d = ExportConfig()
    cfg = ExportConfig(
        per_class=_choice(t, "per_class", ("auto", "all", "none"), d.per_class),  # type: ignore[arg-type]
        per_class_max_classes=_non_negative_int(t, "per_class_max_classes", d.per_class_max_classes),
        max_series=_non_negative_int(t, "max_series", d.max_series),
    )
    t.done(_field_names(ExportConfig))
    return cfg


def _parse_labels(t: _Table) -> LabelsConfig:
    d = LabelsConfig()
    ttl = _duration(t, "ttl", d.ttl_seconds)
    if ttl > MAX_LABEL_TTL_SECONDS:
        t.error(f"{t.where('ttl')}: at most 400d, got {ttl:.0f} seconds")
        ttl = d.ttl_seconds
    buckets = t.take("delay_buckets", list, list(d.delay_buckets))
    ok = all(isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) and b > 0 for b in buckets)
    if not buckets or not ok or any(a >= b for a, b in zip(buckets, buckets[1:], strict=False)):
        t.error(f"{t.where('delay_buckets')}: expected increasing positive numbers of seconds, got {buckets!r}")
        buckets = list(d.delay_buckets)
    cfg = LabelsConfig(
        ttl_seconds=ttl,
        max_pending_bytes=_positive_int(t, "max_pending_bytes", d.max_pending_bytes),
        delay_buckets=tuple(float(b) for b in buckets),
    )
    t.done(["ttl", "max_pending_bytes", "delay_buckets"])
    return cfg


def _parse_calibration(t: _Table) -> CalibrationConfig:
    d = CalibrationConfig()
    bins = _positive_int(t, "bins", d.bins)
    if bins > MAX_CALIBRATION_BINS:
        t.error(f"{t.where('bins')}: at most {MAX_CALIBRATION_BINS}, got {bins}")
        bins = d.bins
    t.done(_field_names(CalibrationConfig))
    return CalibrationConfig(bins=bins)


_SECTIONS = [
    "ingest",
    "metrics",
    "windows",
    "scoring",
    "models",
    "limits",
    "engine",
    "log",
    "state",
    "export",
    "labels",
    "calibration",
]


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from parsed TOML.

    Raises one :class:`ConfigError` that lists every problem found, one per line:
    each table is parsed to its end even after a bad key, with the default in its place.
    """
    root = _Table(data, "")

    def section(key: str, parse: Callable[[_Table], T], default: T) -> T:
        return root.guard(lambda: parse(root.take_table(key)), default)

    ingest = section("ingest", _parse_ingest, IngestConfig())
    metrics = section("metrics", _parse_metrics, MetricsConfig())
    windows = section("windows", _parse_windows, WindowsConfig())
    scoring = section("scoring", lambda t: _parse_scoring(t, ScoringConfig()), ScoringConfig())
    models: dict[str, ScoringConfig] = {}
    models_table = root.guard(lambda: root.take_table("models"), _Table({}, "models"))
    for name in models_table.keys():  # noqa: SIM118 - a _Table, not a dict
        if not MODEL_NAME_RE.fullmatch(name):
            root.error(f"models.{name!r}: not a valid model name (1-128 characters of A-Z a-z 0-9 _ . : -)")
            continue
        model_table = root.guard(functools.partial(models_table.take_table, name), None)
        if model_table is not None:
            models[name] = root.guard(functools.partial(_parse_scoring, model_table, scoring, per_model=True), scoring)
    limits = section("limits", _parse_limits, LimitsConfig())
    engine = section("engine", _parse_engine, EngineConfig())
    log = section("log", _parse_log, LogConfig())
    state = section("state", _parse_state, StateConfig())
    export = section("export", _parse_export, ExportConfig())
    labels = section("labels", _parse_labels, LabelsConfig())
    calibration = section("calibration", _parse_calibration, CalibrationConfig())
    root.done(_SECTIONS)
    root.raise_errors()
    return Config(
        ingest=ingest,
        metrics=metrics,
        windows=windows,
        scoring=scoring,
        models=MappingProxyType(models),
        limits=limits,
        engine=engine,
        log=log,
        state=state,
        export=export,
        labels=labels,
        calibration=calibration,
    )


def load(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        return from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def with_overrides(
    cfg: Config, *, ingest: str | None = None, metrics: str | None = None, state_dir: str | None = None
) -> Config:
    """Apply the ``--ingest``, ``--metrics`` and ``--state-dir`` command-line overrides."""
    if ingest is not None:
        problem = _endpoint_problem(ingest, "--ingest")  # the same check as the file's
        if problem is not None:
            raise ConfigError(problem)
        address = ingest
        fixed = dataclasses.replace(cfg.ingest, address=address)
        if fixed.curve is not None and not address.startswith("tcp://"):
            raise ConfigError(
                f"--ingest: CURVE authentication is configured, which needs a tcp:// address, got {address!r}"
            )
        cfg = dataclasses.replace(cfg, ingest=fixed)
    if metrics is not None:
        host, port = parse_listen(metrics, "--metrics")
        cfg = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, host=host, port=port))
    if state_dir is not None:
        if not state_dir:
            raise ConfigError("--state-dir: empty; under systemd, set StateDirectory= in the unit")
        cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, directory=state_dir))
    return cfg
