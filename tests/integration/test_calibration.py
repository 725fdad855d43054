"""Calibration, Brier and normalized entropy (issue 14) through the real daemon over real sockets.

Every figure the daemon exports for a model (the lifetime bin counters and Brier summary,
and the window gauges of a time window, a wrapped count window and, for single-message
models, the ewma) is compared with tests/calibration_oracle.py, an independent float64
oracle, and the binary Brier score also with scikit-learn. Relative 1e-9 for FP64 inputs,
2e-5 for FP32.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import brier_score_loss

from tests import calibration_oracle as oracle
from tests.integration.harness import DaemonProcess
from xentd import Publisher

FP64, FP32 = 1e-9, 2e-5
EPS64, EPS32 = float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)
DEFAULT_BINS = 15
CLASS_LIMIT = 4  # multiclass models below have 5 or 6 classes: the "other" slot is in the prior
COUNT = 50
# Every model sends more than COUNT samples, so last_50 has wrapped.
CONFIG = f'[windows]\ntime = ["1h"]\ncount = [{COUNT}]\n[limits]\nclass_limit = {CLASS_LIMIT}\n'
LAST = f"last_{COUNT}"
WINDOWS = ("1h", LAST, "ewma")  # every window the daemon has gets the gauges

LIFETIME = ("xentd_calibration_weight_total", "xentd_calibration_confidence_total", "xentd_calibration_outcome_total")
GAUGES = {
    "ece": "xentd_window_calibration_error",
    "mce": "xentd_window_max_calibration_error",
    "brier": "xentd_window_brier_score",
    "reliability": "xentd_window_brier_reliability",
    "resolution": "xentd_window_brier_resolution",
    "uncertainty": "xentd_window_brier_uncertainty",
    "normalized_entropy": "xentd_window_normalized_entropy",
    # Not new in issue 14, but NE's numerator: checked so that an NE mismatch says which half is off.
    "mean_cross_entropy": "xentd_window_cross_entropy_nats",
}

Key = tuple[str, frozenset[tuple[str, str]]]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon, default bins, for every test that only adds to its own models."""
    d = DaemonProcess(tmp_path_factory.mktemp("xentd-calibration"), CONFIG)
    yield d
    assert d.stop() == 0, d.log


def _series(d: DaemonProcess, model: str) -> dict[Key, float]:
    """Every sample of one model from one scrape, keyed without the model label."""
    return {
        (name, frozenset(kv for kv in labels if kv[0] != "model")): v
        for (name, labels), v in d.samples().items()
        if ("model", model) in labels
    }


def _expected(
    s: oracle.Samples, w: np.ndarray | None, bins: int, windows: dict[str, np.ndarray | slice]
) -> dict[Key, float | None]:
    """What the daemon should export for a model that scored ``s`` in this order; None: absent."""
    weights = np.ones(len(s)) if w is None else np.asarray(w, np.float64)
    rb = oracle.reliability_bins(s, weights, bins)
    out: dict[Key, float | None] = {}
    for b, label in enumerate(oracle.bin_labels(bins)):
        key = frozenset({("bin", label)})
        out[(LIFETIME[0], key)] = float(rb.weight[b])
        out[(LIFETIME[1], key)] = float(rb.confidence[b])
        out[(LIFETIME[2], key)] = float(rb.outcome[b])
    out[("xentd_brier_score_sum", frozenset())] = float(weights @ s.brier)
    out[("xentd_brier_score_count", frozenset())] = float(weights.sum())
    for window, rows in windows.items():
        fig = oracle.figures(s.take(rows), weights[rows], bins)
        for field, name in GAUGES.items():
            out[(name, frozenset({("window", window)}))] = getattr(fig, field)
    return out


def _compare(got: dict[Key, float], expected: dict[Key, float | None], rel: float, bins: int) -> None:
    """All mismatches at once, each with the expected and the exported value."""
    bad = []
    for key, want in expected.items():
        have = got.get(key)
        if want is None:
            if have is not None:
                bad.append(f"{key}: expected absent, got {have!r}")
        elif have is None:
            bad.append(f"{key}: expected {want!r}, absent")
        elif have != pytest.approx(want, rel=rel, abs=1e-300):
            bad.append(f"{key}: expected {want!r}, got {have!r} (rel {abs(have - want) / abs(want):.3g})")
    for window in WINDOWS:
        for name in (GAUGES["ece"], GAUGES["mce"], GAUGES["brier"]):
            if (name, frozenset({("window", window)})) not in got:
                bad.append(f"{name}{{window={window!r}}}: absent")
    # All B bins, no other: labels are the upper edges, "1.0" the last.
    labels = oracle.bin_labels(bins)
    assert labels[-1] == "1.0"
    for name in LIFETIME:
        have_bins = sorted((dict(k[1])["bin"] for k in got if k[0] == name), key=float)
        if have_bins != labels:
            bad.append(f"{name}: bins {have_bins}, expected {labels}")
    assert not bad, "\n".join(bad)


def _bins_in_exposition_order(d: DaemonProcess, name: str, model: str) -> list[str]:
    """The ``bin`` labels of one model's counter in the order /metrics writes them."""
    status, text = d.get("/metrics")
    assert status == 200, text
    return [
        s.labels["bin"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("model") == model
    ]


def _away_from_edges(conf: np.ndarray, margin: float, *bin_counts: int) -> np.ndarray:
    keep = np.ones(len(conf), bool)
    for b in bin_counts:
        keep &= ~oracle.near_bin_edge(conf, b, margin)
    return keep


def _edge_probabilities(bins: int) -> np.ndarray:
    """0, 1 and every inner edge k/B as float64 computes it: floor(p * B) decides their bin."""
    return np.concatenate([[0.0, 1.0], np.arange(1, bins) / bins])


def test_binary_fp64_weighted_probabilities(daemon: DaemonProcess) -> None:
    rng = np.random.default_rng(140)
    n = 400
    p = rng.beta(0.7, 0.7, n)
    edges = _edge_probabilities(DEFAULT_BINS)
    p[rng.choice(n, len(edges), replace=False)] = edges
    t = (rng.random(n) < p**1.5).astype(np.float64)  # over-confident: ECE well above 0
    w = rng.uniform(0, 2, n)
    w[rng.choice(n, 5, replace=False)] = 0.0
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        for part in np.array_split(np.arange(n), 4):
            pub.send("cal-bin", p[part], t[part].astype(np.int64), weights=w[part])
    daemon.wait_for("xentd_samples_total", float(n), model="cal-bin")
    got = _series(daemon, "cal-bin")
    for name in LIFETIME:
        assert _bins_in_exposition_order(daemon, name, "cal-bin") == oracle.bin_labels(DEFAULT_BINS)
    s = oracle.binary(p, t, "probs", eps=EPS64)
    _compare(got, _expected(s, w, DEFAULT_BINS, {"1h": slice(None), LAST: slice(n - COUNT, n)}), FP64, DEFAULT_BINS)
    ref = brier_score_loss(t.astype(np.int64), p, sample_weight=w)
    mean = got[("xentd_brier_score_sum", frozenset())] / got[("xentd_brier_score_count", frozenset())]
    assert mean == pytest.approx(ref, rel=FP64)
    assert got[("xentd_window_brier_score", frozenset({("window", "1h")}))] == pytest.approx(ref, rel=FP64)
    tail = slice(n - COUNT, n)
    assert got[("xentd_window_brier_score", frozenset({("window", LAST)}))] == pytest.approx(
        brier_score_loss(t[tail].astype(np.int64), p[tail], sample_weight=w[tail]), rel=FP64
    )


def test_multiclass_fp32_logits_with_class_index_targets(daemon: DaemonProcess) -> None:
    rng = np.random.default_rng(141)
    n, c = 330, 6
    z = (rng.normal(0, 2.5, (n, c)) + 1.5 * np.eye(c)[rng.integers(0, c, n)]).astype(np.float32)
    y = np.where(rng.random(n) < 0.6, z.argmax(axis=1), rng.integers(0, c, n))
    # A float32 softmax may put a confidence within ~1e-6 of an edge in the next bin; keep clear of them.
    keep = _away_from_edges(oracle.softmax(z).max(axis=1), 1e-5, DEFAULT_BINS)
    z, y = z[keep], y[keep]
    n = len(y)
    w = rng.uniform(0.1, 2, n)
    assert n > 300
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        pub.send("cal-logits32", z, y, input="logits", weights=w)  # one message: one fold, so the ewma is exact too
    daemon.wait_for("xentd_samples_total", float(n), model="cal-logits32")
    got = _series(daemon, "cal-logits32")
    s = oracle.multiclass(z, y, "logits", eps=EPS32, class_limit=CLASS_LIMIT)
    windows: dict[str, np.ndarray | slice] = {"1h": slice(None), LAST: slice(n - COUNT, n), "ewma": slice(None)}
    _compare(got, _expected(s, w, DEFAULT_BINS, windows), FP32, DEFAULT_BINS)
    ref = brier_score_loss(y, oracle.softmax(z), labels=range(c), sample_weight=w, scale_by_half=False)
    assert got[("xentd_brier_score_sum", frozenset())] / float(w.sum()) == pytest.approx(ref, rel=FP32)


@pytest.mark.parametrize(
    "model, kind, dtype, rel",
    [("cal-soft-probs64", "probs", np.float64, FP64), ("cal-soft-logits32", "logits", np.float32, FP32)],
)
def test_multiclass_soft_targets(daemon: DaemonProcess, model: str, kind: str, dtype: type, rel: float) -> None:
    rng = np.random.default_rng(142)
    n, c = 240, 6  # classes 4 and 5 share the prior's "other" slot
    z = rng.normal(0, 2, (n, c))
    pred: np.ndarray = (oracle.softmax(z) if kind == "probs" else z).astype(dtype)
    tgt: np.ndarray = rng.dirichlet(np.full(c, 0.4), n).astype(dtype)
    if kind == "probs":
        # Ties: the prediction's argmax and the targets' argmax go to the lowest index.
        pred[:4] = [[0.4, 0.4, 0.1, 0.05, 0.03, 0.02]] * 4
        tgt[:4] = [
            [0, 1, 0, 0, 0, 0],
            [0.45, 0.45, 0.1, 0, 0, 0],
            [0.25, 0.25, 0.25, 0.25, 0, 0],
            [0, 0, 0, 0, 0.5, 0.5],  # true class 4; the prior's "other" slot gets all of it
        ]
    else:
        keep = _away_from_edges(oracle.softmax(pred).max(axis=1), 1e-5, DEFAULT_BINS)
        pred, tgt = pred[keep], tgt[keep]
        n = len(tgt)
    w = rng.uniform(0, 3, n)
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        for part in np.array_split(np.arange(n), 2):
            pub.send(model, pred[part], tgt[part], input=kind, weights=w[part])
    daemon.wait_for("xentd_samples_total", float(n), model=model)
    s = oracle.multiclass(pred, tgt, kind, eps=float(np.finfo(dtype).eps), class_limit=CLASS_LIMIT)
    if kind == "probs":
        assert s.outcome[:4].tolist() == [0.0, 1.0, 1.0, 0.0]
    _compare(
        _series(daemon, model),
        _expected(s, w, DEFAULT_BINS, {"1h": slice(None), LAST: slice(n - COUNT, n)}),
        rel,
        DEFAULT_BINS,
    )


def test_delayed_labels_feed_every_figure(daemon: DaemonProcess) -> None:
    """Predictions-only then labels-only messages (ids): the pairs count as scored in the order
    their labels came, so the count window holds the last labels."""
    rng = np.random.default_rng(143)
    n, c = 300, 5
    zb = rng.normal(0, 2, n)
    tb = np.clip(oracle.sigmoid(zb) + rng.normal(0, 0.3, n), 0.0, 1.0)  # soft binary labels
    lp = np.log(oracle.softmax(rng.normal(0, 2, (n, c))))
    y = rng.integers(0, c, n)
    w = rng.uniform(0, 2, n)
    ids = rng.permutation(10**12 + np.arange(n, dtype=np.int64))
    order = rng.permutation(n)
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        for part in np.array_split(np.arange(n), 4):
            pub.send_predictions("late-bin", zb[part], ids[part], input="logits", weights=w[part])
            pub.send_predictions("late-mc", lp[part], ids[part], input="log_probs", weights=w[part])
        daemon.wait_for("xentd_pending_predictions", float(n), model="late-bin")
        daemon.wait_for("xentd_pending_predictions", float(n), model="late-mc")
        for part in np.array_split(order, 5):
            pub.send_labels("late-bin", tb[part], ids[part])
            pub.send_labels("late-mc", y[part], ids[part])
    daemon.wait_for("xentd_samples_total", float(n), model="late-bin")
    daemon.wait_for("xentd_samples_total", float(n), model="late-mc")
    windows: dict[str, np.ndarray | slice] = {"1h": slice(None), LAST: slice(n - COUNT, n)}
    sb = oracle.binary(zb[order], tb[order], "logits", eps=EPS64)
    _compare(_series(daemon, "late-bin"), _expected(sb, w[order], DEFAULT_BINS, windows), FP64, DEFAULT_BINS)
    sm = oracle.multiclass(lp[order], y[order], "log_probs", eps=EPS64, class_limit=CLASS_LIMIT)
    _compare(_series(daemon, "late-mc"), _expected(sm, w[order], DEFAULT_BINS, windows), FP64, DEFAULT_BINS)


def test_normalized_entropy_is_absent_while_the_prior_has_no_entropy(daemon: DaemonProcess) -> None:
    rng = np.random.default_rng(144)
    n = 80
    p = rng.uniform(0.05, 0.95, n)
    probs = oracle.softmax(rng.normal(0, 2, (n, 4)))
    # "shift": mixed targets, then COUNT + 10 negatives: the count window has H = 0, the time window not.
    t_shift = np.concatenate([rng.integers(0, 2, n), np.zeros(COUNT + 10, np.int64)])
    p_shift = rng.uniform(0.05, 0.95, len(t_shift))
    # Classes 4 and 5 of 6 only: one slot ("other"), so H = 0 as for one class.
    z_other = rng.normal(0, 2, (n, 6))
    y_other = rng.integers(CLASS_LIMIT, 6, n)
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        pub.send("ne-all-positive", p, np.ones(n, np.int64))
        pub.send("ne-one-class", probs, np.full(n, 2))
        pub.send("ne-shift", p_shift[:n], t_shift[:n])
        pub.send("ne-shift", p_shift[n:], t_shift[n:])
        pub.send("ne-other-only", z_other, y_other, input="logits")
    models = (("ne-all-positive", n), ("ne-one-class", n), ("ne-shift", len(t_shift)), ("ne-other-only", n))
    for model, count in models:
        daemon.wait_for("xentd_samples_total", float(count), model=model)
    everywhere: dict[str, np.ndarray | slice] = {"1h": slice(None), LAST: slice(n - COUNT, n), "ewma": slice(None)}
    s = oracle.binary(p, np.ones(n), "probs", eps=EPS64)
    expected = _expected(s, None, DEFAULT_BINS, everywhere)
    assert [v for k, v in expected.items() if k[0] == GAUGES["normalized_entropy"]] == [None] * 3
    _compare(_series(daemon, "ne-all-positive"), expected, FP64, DEFAULT_BINS)
    s = oracle.multiclass(probs, np.full(n, 2), "probs", eps=EPS64, class_limit=CLASS_LIMIT)
    _compare(_series(daemon, "ne-one-class"), _expected(s, None, DEFAULT_BINS, everywhere), FP64, DEFAULT_BINS)
    s = oracle.multiclass(z_other, y_other, "logits", eps=EPS64, class_limit=CLASS_LIMIT)
    expected = _expected(s, None, DEFAULT_BINS, everywhere)
    assert [v for k, v in expected.items() if k[0] == GAUGES["normalized_entropy"]] == [None] * 3
    _compare(_series(daemon, "ne-other-only"), expected, FP64, DEFAULT_BINS)
    m = len(t_shift)
    s = oracle.binary(p_shift, t_shift, "probs", eps=EPS64)
    expected = _expected(s, None, DEFAULT_BINS, {"1h": slice(None), LAST: slice(m - COUNT, m)})
    assert expected[(GAUGES["normalized_entropy"], frozenset({("window", LAST)}))] is None
    assert expected[(GAUGES["normalized_entropy"], frozenset({("window", "1h")}))] is not None
    _compare(_series(daemon, "ne-shift"), expected, FP64, DEFAULT_BINS)


def test_every_bin_is_present_and_bins_of_zero_weight_are_left_out_of_mce(daemon: DaemonProcess) -> None:
    # Bin 14 holds only a sample of weight 0: W_14 = 0, so MCE skips it (not 0/0).
    p = np.array([0.05, 0.5, 0.97, 0.3, 0.52] * 12)
    t = np.array([0, 1, 1, 1, 0] * 12)
    w = np.array([1.0, 2.0, 0.0, 1.0, 0.5] * 12)
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        pub.send("cal-sparse", p, t, weights=w)
    daemon.wait_for("xentd_samples_total", float(len(p)), model="cal-sparse")
    s = oracle.binary(p, t, "probs", eps=EPS64)
    windows: dict[str, np.ndarray | slice] = {"1h": slice(None), LAST: slice(len(p) - COUNT, None), "ewma": slice(None)}
    expected = _expected(s, w, DEFAULT_BINS, windows)
    assert expected[(LIFETIME[0], frozenset({("bin", "1.0")}))] == 0.0
    _compare(_series(daemon, "cal-sparse"), expected, FP64, DEFAULT_BINS)


def test_bins_setting_changes_the_number_of_bins(daemon: DaemonProcess, tmp_path: Path) -> None:
    bins = 10
    # This daemon also scores every batch with the multi-threaded kernels (parallel_threshold = 1).
    other = DaemonProcess(tmp_path, CONFIG + f"[calibration]\nbins = {bins}\n[engine]\nparallel_threshold = 1\n")
    try:
        rng = np.random.default_rng(145)
        n = 120
        p = rng.uniform(0, 1, n)
        p[: bins + 1] = _edge_probabilities(bins)
        t = (rng.random(n) < p).astype(np.int64)
        w = rng.uniform(0.5, 1.5, n)
        probs = oracle.softmax(rng.normal(0, 2, (n, 5)))
        y = rng.integers(0, 5, n)
        lp = np.log(rng.uniform(0.01, 1, n))
        z = rng.normal(0, 2, (n, 7)).astype(np.float32)
        z = z[_away_from_edges(oracle.softmax(z).max(axis=1), 1e-5, bins)]
        with Publisher(other.ingest, connect_timeout=30) as pub:
            pub.send("ten-bin", p, t, weights=w)
            pub.send("ten-mc", probs, y)
            pub.send("ten-logp", lp, t, input="log_probs")
            pub.send("ten-logits32", z, y[: len(z)], input="logits", weights=w[: len(z)])
        for model, count in (("ten-bin", n), ("ten-mc", n), ("ten-logp", n), ("ten-logits32", len(z))):
            other.wait_for("xentd_samples_total", float(count), model=model)
        windows: dict[str, np.ndarray | slice] = {"1h": slice(None), LAST: slice(n - COUNT, n)}
        s = oracle.binary(p, t, "probs", eps=EPS64)
        _compare(_series(other, "ten-bin"), _expected(s, w, bins, windows), FP64, bins)
        s = oracle.multiclass(probs, y, "probs", eps=EPS64, class_limit=CLASS_LIMIT)
        _compare(_series(other, "ten-mc"), _expected(s, None, bins, windows), FP64, bins)
        s = oracle.binary(lp, t, "log_probs", eps=EPS64)
        _compare(_series(other, "ten-logp"), _expected(s, None, bins, windows), FP64, bins)
        s = oracle.multiclass(z, y[: len(z)], "logits", eps=EPS32, class_limit=CLASS_LIMIT)
        k = len(z)
        _compare(
            _series(other, "ten-logits32"),
            _expected(s, w[:k], bins, {"1h": slice(None), LAST: slice(k - COUNT, k)}),
            FP32,
            bins,
        )
        assert oracle.bin_labels(bins) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0"]
    finally:
        assert other.stop() == 0, other.log
    # The default daemon, for contrast: the same binary batch in 15 bins.
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        pub.send("fifteen-bin", p, t, weights=w)
    daemon.wait_for("xentd_samples_total", float(n), model="fifteen-bin")
    s = oracle.binary(p, t, "probs", eps=EPS64)
    _compare(_series(daemon, "fifteen-bin"), _expected(s, w, DEFAULT_BINS, {"1h": slice(None)}), FP64, DEFAULT_BINS)


def _xentd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xentd", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", ["0", "-3", "1001", "2.5", '"10"', "true"])
def test_a_bad_bins_value_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[calibration]\nbins = {value}\n")
    out = _xentd("check-config", str(cfg))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("xentd: error: ") and "calibration.bins" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_misspelt_bins_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[calibration]\nbin = 10\n")
    out = _xentd("check-config", str(cfg))
    assert out.returncode == 2 and "calibration.bin: unknown key (did you mean 'bins'?)" in out.stderr, out.stderr


def test_the_daemon_refuses_to_start_with_a_bad_bins_value(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[calibration]\nbins = 0\n")
    out = _xentd("run", "--config", str(cfg), "--ingest", "tcp://127.0.0.1:*", "--metrics", "127.0.0.1:0")
    assert out.returncode == 2 and "calibration.bins" in out.stderr and "Traceback" not in out.stderr, out.stderr
    # The issue sets no upper limit; the daemon documents one (config/xentd.toml), and a value
    # past any limit the notes name (1000) must be refused.
    for good in ("1", "15", "100"):
        cfg.write_text(f"[calibration]\nbins = {good}\n")
        ok = _xentd("check-config", str(cfg))
        assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr


def test_cuda_backend_on_the_simulator_matches_the_oracle(tmp_path: Path) -> None:
    """The same figures from the CUDA kernels (Numba's simulator, which is slow: a few rows; the
    windows are the CPU's state, tested above, so the kernels' per-sample values are what is new)."""
    d = DaemonProcess(
        tmp_path,
        CONFIG + '[engine]\nbackend = "cuda"\ncuda_threads_per_block = 8\n',
        env={"NUMBA_ENABLE_CUDASIM": "1"},
    )
    try:
        assert "CUDA backend ready on simulator" in d.log
        rng = np.random.default_rng(146)
        n, c = 24, 6
        p = rng.uniform(0, 1, n)
        p[: DEFAULT_BINS + 1] = _edge_probabilities(DEFAULT_BINS)
        t = (rng.random(n) < p).astype(np.int64)
        w = rng.uniform(0, 2, n)
        z = rng.normal(0, 2, (n, c)).astype(np.float32)
        z = z[_away_from_edges(oracle.softmax(z).max(axis=1), 1e-5, DEFAULT_BINS)]
        y = rng.integers(0, c, len(z))
        soft = rng.dirichlet(np.full(c, 0.5), n)
        logp = np.log(oracle.softmax(rng.normal(0, 2, (n, c))))
        with Publisher(d.ingest, connect_timeout=30) as pub:
            pub.send("cuda-bin", p, t, weights=w)
            pub.send("cuda-logits32", z, y, input="logits")
            pub.send("cuda-soft", logp, soft, input="log_probs", weights=w)
        for model, count in (("cuda-bin", n), ("cuda-logits32", len(z)), ("cuda-soft", n)):
            d.wait_for("xentd_samples_total", float(count), timeout=120, model=model)
        every: dict[str, np.ndarray | slice] = {"1h": slice(None), "ewma": slice(None)}
        s = oracle.binary(p, t, "probs", eps=EPS64)
        _compare(_series(d, "cuda-bin"), _expected(s, w, DEFAULT_BINS, every), FP64, DEFAULT_BINS)
        s = oracle.multiclass(z, y, "logits", eps=EPS32, class_limit=CLASS_LIMIT)
        _compare(_series(d, "cuda-logits32"), _expected(s, None, DEFAULT_BINS, every), FP32, DEFAULT_BINS)
        s = oracle.multiclass(logp, soft, "log_probs", eps=EPS64, class_limit=CLASS_LIMIT)
        _compare(_series(d, "cuda-soft"), _expected(s, w, DEFAULT_BINS, every), FP64, DEFAULT_BINS)
    finally:
        assert d.stop() == 0, d.log


def test_the_figures_survive_a_restart_and_keep_counting(tmp_path: Path) -> None:
    """Bins, Brier sums, the count window's samples (soft multiclass targets included, whose
    per-sample prior mass the count window keeps) and the time window come back from the
    snapshot, and the samples after the restart add to them."""
    config = CONFIG + f'[state]\ndirectory = "{tmp_path / "state"}"\nsnapshot_interval = "1h"\n'
    rng = np.random.default_rng(147)
    n, c = 80, 6
    p = rng.uniform(0, 1, 2 * n)
    t = (rng.random(2 * n) < p).astype(np.int64)
    w = rng.uniform(0, 2, 2 * n)
    probs = oracle.softmax(rng.normal(0, 2, (2 * n, c)))
    soft = rng.dirichlet(np.full(c, 0.5), 2 * n)
    before, after = slice(0, n), slice(n, 2 * n)
    (tmp_path / "first").mkdir()
    d = DaemonProcess(tmp_path / "first", config)
    try:
        with Publisher(d.ingest, connect_timeout=30) as pub:
            pub.send("keep-bin", p[before], t[before], weights=w[before])
            pub.send("keep-soft", probs[before], soft[before], weights=w[before])
        d.wait_for("xentd_samples_total", float(n), model="keep-bin")
        d.wait_for("xentd_samples_total", float(n), model="keep-soft")
    finally:
        assert d.stop() == 0, d.log
    (tmp_path / "second").mkdir()
    d = DaemonProcess(tmp_path / "second", config)
    try:
        # One message each so far: the ewma is exact too.
        every: dict[str, np.ndarray | slice] = {"1h": slice(None), LAST: slice(n - COUNT, n), "ewma": slice(None)}
        sb = oracle.binary(p, t, "probs", eps=EPS64)
        ss = oracle.multiclass(probs, soft, "probs", eps=EPS64, class_limit=CLASS_LIMIT)
        _compare(_series(d, "keep-bin"), _expected(sb.take(before), w[before], DEFAULT_BINS, every), FP64, DEFAULT_BINS)
        _compare(
            _series(d, "keep-soft"), _expected(ss.take(before), w[before], DEFAULT_BINS, every), FP64, DEFAULT_BINS
        )
        with Publisher(d.ingest, connect_timeout=30) as pub:
            pub.send("keep-bin", p[after][: COUNT // 2], t[after][: COUNT // 2], weights=w[after][: COUNT // 2])
            pub.send("keep-soft", probs[after][: COUNT // 2], soft[after][: COUNT // 2], weights=w[after][: COUNT // 2])
        m = n + COUNT // 2
        d.wait_for("xentd_samples_total", float(m), model="keep-bin")
        d.wait_for("xentd_samples_total", float(m), model="keep-soft")
        # last_50 now spans the restart: half its samples came back from the snapshot.
        windows: dict[str, np.ndarray | slice] = {"1h": slice(None), LAST: slice(m - COUNT, m)}
        _compare(
            _series(d, "keep-bin"), _expected(sb.take(slice(0, m)), w[:m], DEFAULT_BINS, windows), FP64, DEFAULT_BINS
        )
        _compare(
            _series(d, "keep-soft"), _expected(ss.take(slice(0, m)), w[:m], DEFAULT_BINS, windows), FP64, DEFAULT_BINS
        )
    finally:
        assert d.stop() == 0, d.log
