"""`xentd top`'s view, rendered from synthetic /metrics pages: the calibration and delayed-label columns, the header."""

from __future__ import annotations

import math

from xentd import top

BEFORE = """\
xentd_build_info{version="0.1.0",backend="cpu"} 1
xentd_samples_total{model="full"} 100
xentd_batches_total{model="full"} 10
xentd_samples_total{model="joined"} 40
xentd_batches_total{model="joined"} 4
"""

# "full" has no join traffic; "joined" has matched, expired and evicted predictions;
# "waiting" has only predictions waiting (nothing scored, nothing left the store yet).
# NE and ECE: "full" has both, in two windows; "joined" has an ECE but no NE (its window's
# targets are all of one class, so the daemon exports none); "waiting" has neither.
AFTER = """\
xentd_build_info{version="0.1.0",backend="cpu"} 1
xentd_samples_total{model="full"} 300
xentd_batches_total{model="full"} 30
xentd_window_samples{model="full",window="5m"} 300
xentd_window_cross_entropy_nats{model="full",window="5m"} 0.5
xentd_window_normalized_entropy{model="full",window="5m"} 0.8125
xentd_window_calibration_error{model="full",window="5m"} 0.0625
xentd_window_samples{model="full",window="1h"} 3000
xentd_window_normalized_entropy{model="full",window="1h"} 1.25
xentd_window_calibration_error{model="full",window="1h"} 0.5
xentd_samples_total{model="joined"} 60
xentd_batches_total{model="joined"} 6
xentd_window_samples{model="joined",window="5m"} 60
xentd_window_cross_entropy_nats{model="joined",window="5m"} 0.25
xentd_window_calibration_error{model="joined",window="5m"} 0.1
xentd_label_joins_total{model="joined",outcome="matched"} 60
xentd_label_joins_total{model="joined",outcome="unmatched"} 500
xentd_label_joins_total{model="joined",outcome="duplicate"} 700
xentd_label_joins_total{model="joined",outcome="expired"} 15
xentd_label_joins_total{model="joined",outcome="evicted"} 5
xentd_pending_predictions{model="joined"} 1234
xentd_label_joins_total{model="waiting",outcome="matched"} 0
xentd_label_joins_total{model="waiting",outcome="unmatched"} 0
xentd_label_joins_total{model="waiting",outcome="duplicate"} 0
xentd_label_joins_total{model="waiting",outcome="expired"} 0
xentd_label_joins_total{model="waiting",outcome="evicted"} 0
xentd_pending_predictions{model="waiting"} 7
xentd_pending_bytes 3145728
xentd_pending_bytes_limit 268435456
"""


def _view() -> tuple[top.Scrape, top.Scrape, str]:
    before, after = top.parse(BEFORE, at=10.0), top.parse(AFTER, at=12.0)
    return before, after, top.render(before, after, url="http://x", window="5m")


def _line(view: str, model: str) -> str:
    return next(ln for ln in view.splitlines() if ln.startswith(model + " "))


def test_coverage_is_matched_over_the_predictions_that_left_the_store() -> None:
    coverage = top.join_coverage(top.parse(AFTER, at=0.0))
    assert coverage["joined"] == 60 / (60 + 15 + 5)  # unmatched labels and duplicates are not in it
    assert math.isnan(coverage["waiting"])  # 0 / 0: nothing has left the store yet
    assert "full" not in coverage


def test_rows_show_pending_and_coverage_blank_without_join_traffic() -> None:
    before, after, view = _view()
    rows = {r.model: r for r in top.rows(before, after, "5m")}
    assert list(rows) == ["full", "joined", "waiting"]  # a model with only waiting predictions is listed
    assert (rows["full"].pending, rows["full"].coverage) == (None, None)
    assert rows["joined"].pending == 1234 and rows["joined"].coverage == 0.75
    assert rows["waiting"].samples_per_s == 0 and rows["waiting"].pending == 7
    assert rows["joined"].samples_per_s == (60 - 40) / 2.0
    header = view.splitlines()[3]
    assert header.split()[-2:] == ["PENDING", "COVERAGE"]
    assert _line(view, "joined").split()[-2:] == ["1,234", "75.00%"]
    assert _line(view, "waiting").split()[-2:] == ["7", "-"]
    full = _line(view, "full")
    assert full == full.rstrip() and full.split()[-1] == "-"  # ends at WORST CLASS: the join columns are blank
    assert len(full) < len(_line(view, "joined"))


def test_header_shows_the_join_store_against_its_budget() -> None:
    _, _, view = _view()
    assert "join store 3.0 MiB of 256.0 MiB (1.2%)" in view.splitlines()[1]
    plain = top.render(top.parse(BEFORE, at=0.0), top.parse(BEFORE, at=1.0), url="http://x", window="5m")
    assert "join store" not in plain  # a daemon without the join store exports neither gauge


def test_ne_and_ece_columns_read_the_chosen_windows_gauges() -> None:
    before, after, view = _view()
    rows = {r.model: r for r in top.rows(before, after, "5m")}
    assert (rows["full"].normalized_entropy, rows["full"].calibration_error) == (0.8125, 0.0625)
    assert math.isnan(rows["joined"].normalized_entropy) and rows["joined"].calibration_error == 0.1
    assert math.isnan(rows["waiting"].normalized_entropy) and math.isnan(rows["waiting"].calibration_error)
    hour = {r.model: r for r in top.rows(before, after, "1h")}["full"]
    assert (hour.normalized_entropy, hour.calibration_error) == (1.25, 0.5)
    header = view.splitlines()[3]
    ne_end, ece_end = header.index(" NE ") + 3, header.index(" ECE ") + 4
    assert header.index("BALANCED") < ne_end < ece_end < header.index("WORST CLASS")
    # Right-aligned under their headers: a value ends where its header ends, with a space before it.
    for model, ne, ece in (("full", "0.8125", "0.0625"), ("joined", "-", "0.1000"), ("waiting", "-", "-")):
        line = _line(view, model)
        assert line[ne_end - len(ne) - 1 : ne_end] == " " + ne, model
        assert line[ece_end - len(ece) - 1 : ece_end] == " " + ece, model
