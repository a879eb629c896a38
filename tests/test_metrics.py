"""proxy.server.metrics: families, the text exposition format, ProxyMetrics (no sockets).

Rendered pages are read back with ``parse_exposition`` below, a strict reader of the
format 0.0.4 (what Prometheus' own text parser accepts), so a test checks what a scraper
would see rather than string fragments.
"""

from __future__ import annotations

import math
import random
import re

import pytest

from proxy.server.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, ProxyMetrics, Registry, format_value
from proxy.tls.handshake import HANDSHAKE_FAILURE_KEYS

# --- a strict reader of the text format -------------------------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)\Z")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|\}\Z)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    labels, pos = {}, 1
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match, f"bad label set {text!r} at {pos}"
        name, raw = match.group(1), match.group(2)
        assert name not in labels, f"repeated label {name}"
        labels[name] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], raw)
        pos = match.end()
    return labels


def _value(text: str) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    return special[text] if text in special else float(text)


def parse_exposition(page: bytes) -> dict[str, dict]:
    """{family: {"help", "type", "samples": [(name, labels, value)]}}; asserts on anything off."""
    text = page.decode("utf-8")
    assert text.endswith("\n"), "the page must end with a newline"
    families: dict[str, dict] = {}
    current, current_name = None, ""
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            assert name not in families, f"{name} described twice"
            current_name = name
            current = families[name] = {"help": help_text.replace("\\n", "\n").replace("\\\\", "\\"),
                                         "type": None, "samples": []}
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            assert current is families.get(name) and current["type"] is None and not current["samples"]
            assert kind in _SUFFIXES
            current["type"] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            name, labels, value = match.group(1), _labels(match.group(2)), _value(match.group(3))
            assert current is not None and current["type"], f"{name} before its HELP and TYPE"
            assert name in {current_name + suffix for suffix in _SUFFIXES[current["type"]]}, name
            current["samples"].append((name, labels, value))
    return families


def sample(families: dict, name: str, **labels: str) -> float:
    family = families[re.sub(r"_(bucket|sum|count)\Z", "", name)] if name not in families else families[name]
    found = [value for sample_name, got, value in family["samples"] if sample_name == name and got == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


# --- families ---------------------------------------------------------------------------


def test_labelled_counter_renders_help_type_and_one_series_per_label_values():
    registry = Registry()
    requests = registry.counter("app_requests_total", "Requests served.", ("service", "status"))
    requests.labels("api", 200).inc()
    requests.labels("api", 200).inc(2)
    requests.labels("web", 404).inc()
    families = parse_exposition(registry.render())
    assert families["app_requests_total"]["help"] == "Requests served."
    assert families["app_requests_total"]["type"] == "counter"
    assert sample(families, "app_requests_total", service="api", status="200") == 3
    assert sample(families, "app_requests_total", service="web", status="404") == 1
    assert len(families["app_requests_total"]["samples"]) == 2


def test_labels_are_cached_and_int_and_text_values_share_one_series():
    counter = Counter("c_total", "c", ("status",))
    assert counter.labels(200) is counter.labels(200)
    assert counter.labels(200) is counter.labels("200")
    counter.labels(200).inc()
    counter.labels("200").inc()
    families = parse_exposition(_render(counter))
    assert families["c_total"]["samples"] == [("c_total", {"status": "200"}, 2)]


def _render(*metrics) -> bytes:
    registry = Registry()
    for metric in metrics:
        registry.register(metric)
    return registry.render()


def test_label_values_are_escaped_and_read_back_unchanged():
    gauge = Gauge("g", "g", ("path", "subject"))
    tricky = 'C:\\certs\\"odd"\nname'
    gauge.labels(tricky, 'CN=a "quoted",O=b\\c').set(7)
    page = _render(gauge)
    assert b'path="C:\\\\certs\\\\\\"odd\\"\\nname"' in page
    assert sample(parse_exposition(page), "g", path=tricky, subject='CN=a "quoted",O=b\\c') == 7


def test_any_label_value_survives_the_round_trip():
    rng = random.Random(4514)
    alphabet = 'ab\\"\n{},= é\tn\\n'
    values = {"".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(300)}
    gauge = Gauge("g", "g", ("v",))
    for index, value in enumerate(sorted(values)):
        gauge.labels(value).set(index)
    families = parse_exposition(_render(gauge))
    assert {labels["v"]: value for _, labels, value in families["g"]["samples"]} == {
        value: index for index, value in enumerate(sorted(values))
    }


def test_help_text_escapes_backslash_and_newline_only():
    gauge = Gauge("g", 'says "hi"\nand \\ more')
    page = _render(gauge)
    assert b'# HELP g says "hi"\\nand \\\\ more\n' in page
    assert parse_exposition(page)["g"]["help"] == 'says "hi"\nand \\ more'


def test_unlabelled_counter_and_gauge():
    counter, gauge = Counter("done_total", "d"), Gauge("level", "l")
    counter.inc()
    counter.inc(4)
    gauge.set(10)
    gauge.inc(2)
    gauge.dec(5)
    families = parse_exposition(_render(counter, gauge))
    assert sample(families, "done_total") == 5 and counter.value == 5
    assert sample(families, "level") == 7 and gauge.value == 7


def test_counter_refuses_to_go_down():
    with pytest.raises(ValueError, match="only goes up"):
        Counter("c_total", "c").inc(-1)


def test_wrong_use_of_labels_is_refused():
    labelled = Counter("c_total", "c", ("a", "b"))
    with pytest.raises(ValueError, match="takes 2 label values, got 1"):
        labelled.labels("x")
    with pytest.raises(ValueError, match="use .labels"):
        labelled.inc()
    with pytest.raises(ValueError, match="invalid metric name"):
        Counter("bad-name", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        Counter("c", "x", ("__reserved",))
    with pytest.raises(ValueError, match="reserved"):
        Histogram("h", "x", ("le",))
    registry = Registry()
    registry.counter("c_total", "c")
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("c_total", "again")


def test_callback_gauge_is_evaluated_at_each_render():
    open_connections = []
    gauge = Gauge("open", "o")
    gauge.set_function(lambda: len(open_connections))
    assert sample(parse_exposition(_render(gauge)), "open") == 0
    open_connections += ["a", "b"]
    assert sample(parse_exposition(_render(gauge)), "open") == 2


def test_bool_values_render_as_0_and_1():
    gauge = Gauge("draining", "d")
    gauge.set_function(lambda: True)
    assert b"draining 1\n" in _render(gauge)
    assert format_value(False) == "0"


def test_a_failing_callback_drops_its_sample_not_the_page(caplog):
    broken, fine = Gauge("broken", "b"), Gauge("fine", "f")
    broken.set_function(lambda: 1 / 0)
    fine.set(1)
    families = parse_exposition(_render(broken, fine))
    assert families["broken"]["samples"] == [] and sample(families, "fine") == 1
    assert "callback for broken failed" in caplog.text


def test_special_float_values():
    assert [format_value(v) for v in (math.inf, -math.inf, math.nan, 0.25, 3)] == ["+Inf", "-Inf", "NaN", "0.25", "3"]


def test_clear_forgets_every_series():
    gauge = Gauge("g", "g", ("path",))
    gauge.labels("old.pem").set(1)
    gauge.clear()
    gauge.labels("new.pem").set(2)
    assert parse_exposition(_render(gauge))["g"]["samples"] == [("g", {"path": "new.pem"}, 2)]


# --- histograms -------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_end_with_inf():
    histogram = Histogram("latency_seconds", "l", ("service",), buckets=(0.1, 1, 0.5))
    for value in (0.05, 0.1, 0.3, 0.7, 2.0, 9.0):
        histogram.labels("api").observe(value)
    families = parse_exposition(_render(histogram))
    buckets = [(labels["le"], value) for name, labels, value in families["latency_seconds"]["samples"]
               if name == "latency_seconds_bucket"]
    # A bucket counts observations <= its bound: 0.1 itself falls in le="0.1".
    assert buckets == [("0.1", 2), ("0.5", 3), ("1.0", 4), ("+Inf", 6)]
    assert all(labels["service"] == "api" for _, labels, _ in families["latency_seconds"]["samples"])
    assert sample(families, "latency_seconds_count", service="api") == 6
    assert sample(families, "latency_seconds_sum", service="api") == pytest.approx(12.15)


def test_unlabelled_histogram_and_an_empty_series():
    histogram = Histogram("h", "h", buckets=(1,))
    families = parse_exposition(_render(histogram))
    assert families["h"]["samples"] == [
        ("h_bucket", {"le": "1.0"}, 0), ("h_bucket", {"le": "+Inf"}, 0), ("h_sum", {}, 0), ("h_count", {}, 0)
    ]
    histogram.observe(5)
    assert sample(parse_exposition(_render(histogram)), "h_bucket", le="+Inf") == 1


def test_histogram_buckets_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        Histogram("h", "h", buckets=(1, 1))


# --- the proxy's metric set -------------------------------------------------------------

PROXY_FAMILIES = {
    "tlsproxy_requests_total": "counter",
    "tlsproxy_request_duration_seconds": "histogram",
    "tlsproxy_active_connections": "gauge",
    "tlsproxy_handshake_failures_total": "counter",
    "tlsproxy_h2_connection_errors_total": "counter",
    "tlsproxy_upstream_connect_errors_total": "counter",
    "tlsproxy_certificate_not_after_seconds": "gauge",
    "tlsproxy_reloads_total": "counter",
    "tlsproxy_last_reload_success": "gauge",
    "tlsproxy_last_reload_timestamp_seconds": "gauge",
    "tlsproxy_draining": "gauge",
}


def test_proxy_metrics_exports_every_family_with_its_type():
    families = parse_exposition(ProxyMetrics().render())
    assert {name: family["type"] for name, family in families.items()} == PROXY_FAMILIES
    assert all(family["help"] for family in families.values())


def test_proxy_metrics_series_exist_at_zero_before_any_event():
    families = parse_exposition(ProxyMetrics().render())
    for key in HANDSHAKE_FAILURE_KEYS:
        assert sample(families, "tlsproxy_handshake_failures_total", reason=key) == 0
    assert sample(families, "tlsproxy_reloads_total", result="ok") == 0
    assert sample(families, "tlsproxy_reloads_total", result="error") == 0
    assert sample(families, "tlsproxy_last_reload_success") == 1
    assert sample(families, "tlsproxy_draining") == 0


def test_proxy_metrics_as_the_core_bumps_them():
    metrics = ProxyMetrics()
    metrics.add_services(["api", "web"])
    metrics.requests.labels("api", 200).inc()
    metrics.request_duration.labels("api").observe(0.02)
    metrics.handshake_failures.labels("expired").inc()
    metrics.upstream_connect_errors.labels("api").inc()
    metrics.active_connections.set_function(lambda: 3)
    metrics.draining.set(1)
    families = parse_exposition(metrics.render())
    assert sample(families, "tlsproxy_requests_total", service="api", status="200") == 1
    assert sample(families, "tlsproxy_request_duration_seconds_bucket", service="api", le="0.025") == 1
    assert sample(families, "tlsproxy_request_duration_seconds_bucket", service="api", le="0.01") == 0
    assert sample(families, "tlsproxy_handshake_failures_total", reason="expired") == 1
    assert sample(families, "tlsproxy_upstream_connect_errors_total", service="api") == 1
    assert sample(families, "tlsproxy_upstream_connect_errors_total", service="web") == 0
    assert sample(families, "tlsproxy_active_connections") == 3
    assert sample(families, "tlsproxy_draining") == 1


def test_record_reload_counts_and_remembers_the_last_result():
    metrics = ProxyMetrics()
    metrics.record_reload(False, now=1000.5)
    families = parse_exposition(metrics.render())
    assert sample(families, "tlsproxy_reloads_total", result="error") == 1
    assert sample(families, "tlsproxy_last_reload_success") == 0
    assert sample(families, "tlsproxy_last_reload_timestamp_seconds") == 1000.5
    metrics.record_reload(True, now=2000.0)
    families = parse_exposition(metrics.render())
    assert sample(families, "tlsproxy_reloads_total", result="ok") == 1
    assert sample(families, "tlsproxy_last_reload_success") == 1
    assert sample(families, "tlsproxy_last_reload_timestamp_seconds") == 2000.0


def test_content_type_is_the_prometheus_text_format():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_record_request_counts_and_times_one_request():
    metrics = ProxyMetrics()
    metrics.record_request("api", 504, 60.5)
    families = parse_exposition(metrics.render())
    assert sample(families, "tlsproxy_requests_total", service="api", status="504") == 1
    assert sample(families, "tlsproxy_request_duration_seconds_bucket", service="api", le="60.0") == 0
    assert sample(families, "tlsproxy_request_duration_seconds_bucket", service="api", le="+Inf") == 1
    assert sample(families, "tlsproxy_request_duration_seconds_sum", service="api") == 60.5
