"""A real Prometheus scrapes running engines: PromQL over its HTTP API sees the mail that went
through them, the shipped alerting rules evaluate (and fire when their scenario happens), and
every query of the shipped Grafana dashboard runs.

Two engines, as in a fleet: ``relay`` sends to a sink that accepts, refuses (550) or defers
(451) recipients by address; ``typo`` has a wrong smart host password, so its mail is deferred
on AUTH. The rule unit tests (``promtool test rules``) prove each alert's firing and quiet
cases with synthetic series; here the same rules run on live data.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deliverd_lab.prometheus import PrometheusMissing, PrometheusServer, promtool
from tests.fixtures.engine import REPO, Engine, free_port
from tests.fixtures.prometheus import PrometheusFactory
from tests.fixtures.smtp_sink import Sink

pytestmark = pytest.mark.integration

MONITORING = REPO / "docs" / "monitoring"
RULES = MONITORING / "deliverd.rules.yml"
RULE_TESTS = MONITORING / "deliverd.rules.test.yml"
DASHBOARD = MONITORING / "deliverd.dashboard.json"
SENDER = "alice@example.test"
ALERTS = ("DeliverdQueueGrowing", "DeliverdOldestDeferredTooOld", "DeliverdSmarthostAuthFailing",
          "DeliverdReloadFailed", "DeliverdQueueDiskShort")


def run_promtool(*args: str) -> str:
    try:
        result = promtool(*args)
    except PrometheusMissing as exc:
        pytest.skip(str(exc))
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    return output


def test_alerting_rules_pass_promtool_check() -> None:
    output = run_promtool("check", "rules", str(RULES))
    assert f"{len(ALERTS)} rules found" in output


def test_every_alert_fires_in_its_scenario_and_is_quiet_otherwise() -> None:
    # The unit file names each alert with a firing and a quiet evaluation.
    text = RULE_TESTS.read_text()
    for alert in ALERTS:
        assert f"alertname: {alert}" in text, alert
    run_promtool("test", "rules", str(RULE_TESTS))


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    found = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(re.sub(r"^label_values\((\w+), *\w+\)$", r"\1", query["query"]))
    return found


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for "All instances" and a 1s scrape interval."""
    return expr.replace("$instance", ".*").replace("$__rate_interval", "1m")


def test_dashboard_is_grafana_json_with_a_query_in_every_panel() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["panels"]
    for panel in board["panels"]:
        assert panel.get("targets"), panel["title"]
    assert all("deliverd_" in q for q in dashboard_queries())


# --- the live lab ------------------------------------------------------------------------------


def relay_spec(port: int, metrics_port: int, **smarthost: Any) -> dict[str, Any]:
    return {
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "127.0.0.1", "port": port, "tls": "none",
                                  **smarthost}},
        "dsn": {"notify_delayed": False},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }


def wait_value(engine: Engine, prom: PrometheusServer, expr: str, expected: float) -> None:
    engine.wait_for(lambda: prom.value(expr) == expected, timeout=30,
                    what=f"{expr} == {expected} (last: {prom.value(expr)})")


def firing(prom: PrometheusServer, alert: str) -> list[dict[str, object]]:
    return prom.query(f'ALERTS{{alertname="{alert}", alertstate="firing"}}')


def test_prometheus_scrapes_engines_and_sees_the_mail_that_went_through(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
    prometheus_factory: PrometheusFactory,
) -> None:
    sink = smtp_sink(rcpt={"bounce@example.net": "550 5.1.1 no such user",
                           "later@example.net": "451 4.3.0 try again"})
    strict = smtp_sink(auth={"relay": "the-right-one"}, require_auth=True,
                       auth_require_tls=False)
    relay = engine_factory(relay_spec(sink.port, free_port(), bounce_on_5xx=True))
    typo = engine_factory(relay_spec(strict.port, free_port(), allow_plaintext_auth=True,
                                     auth={"username": "relay", "password": "a-typo"}))
    at = {"relay": relay.spec["metrics"]["listen"], "typo": typo.spec["metrics"]["listen"]}
    prom = prometheus_factory(list(at.values()), rule_files=[RULES])
    relay.wait_for(prom.targets_up, timeout=30, what="both targets up")

    relay.submit(SENDER, ["bob@example.net", "carol@example.net"])
    relay.submit(SENDER, ["bounce@example.net"])
    relay.submit(SENDER, ["later@example.net"])
    typo.submit(SENDER, ["dave@example.net"])
    relay.wait_status("bounce@example.net", "bounced")
    relay.wait_status(SENDER, "sent")  # the failure DSN for bounce@
    relay.wait_status("later@example.net", "deferred")
    typo.wait_status("dave@example.net", "deferred")

    # Scrapes run every second, each target on its own clock: wait for the values to show.
    # Sent: bob, carol and the DSN to alice; the DSN is queued internally, not received.
    sent = (f'deliverd_recipients_total{{instance="{at["relay"]}", status="sent",'
            ' route="smarthost"}')
    for expr, expected in (
        ('sum(deliverd_recipients_total{status="sent"})', 3),
        (sent, 3),
        ('sum(deliverd_recipients_total{status="bounced"})', 1),
        ("sum(deliverd_messages_received_total)", 4),
        ('sum(deliverd_delivery_delay_seconds_count{status="sent"})', 3),
        ('sum(deliverd_queue_recipients{state="deferred"})', 2),
        ("sum(deliverd_queue_messages)", 2),
        (f'deliverd_smarthost_failures_total{{instance="{at["relay"]}", stage="auth"}}', 0),
        ("count(deliverd_build_info)", 2),
    ):
        wait_value(relay, prom, expr, expected)
    for expr in (
        f'deliverd_deferred_attempts_total{{instance="{at["relay"]}", status_class="4.3"}} >= 1',
        f'deliverd_deferred_attempts_total{{instance="{at["typo"]}", status_class="4.7"}} >= 1',
        f'deliverd_smarthost_failures_total{{instance="{at["typo"]}", stage="auth"}} >= 1',
    ):
        relay.wait_for(lambda expr=expr: prom.query(expr), timeout=30, what=expr)

    # The AUTH alert fires for the typo host only (its retries keep failing).
    typo.wait_for(lambda: firing(prom, "DeliverdSmarthostAuthFailing"), timeout=60,
                  what="AUTH alert firing")
    assert [a["metric"]["instance"] for a in firing(prom, "DeliverdSmarthostAuthFailing")
            ] == [at["typo"]]  # type: ignore[index]

    # A refused reload on the relay shows, and its alert fires.
    text = relay.config.read_text()
    relay.config.write_text(text.replace(f"port = {sink.port}", "port = 70000"))
    relay.signal(signal.SIGHUP)
    wait_value(relay, prom,
               f'deliverd_config_last_reload_successful{{instance="{at["relay"]}"}}', 0)
    relay.wait_for(lambda: firing(prom, "DeliverdReloadFailed"), timeout=30,
                   what="reload alert firing")
    assert prom.value("sum(deliverd_config_reload_failures_total)") == 1

    # The other alerts are quiet: nothing here is old, growing fast, or short of disk.
    assert not firing(prom, "DeliverdQueueGrowing")
    assert not firing(prom, "DeliverdOldestDeferredTooOld")
    free = prom.value(f'deliverd_queue_disk_free_bytes{{instance="{at["relay"]}"}}')
    if free is not None and free > 2 * 1024**3:
        assert not firing(prom, "DeliverdQueueDiskShort")

    # Every rule of the shipped file evaluates on live data without error.
    groups = prom.api("rules")
    assert isinstance(groups, dict)
    rules = [r for g in groups["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(ALERTS)
    assert all(r["health"] == "ok" for r in rules), rules

    # Every query of the dashboard is valid PromQL and finds data.
    for expr in dashboard_queries():
        result = prom.query(grafana_to_promql(expr))
        assert result, f"dashboard query found nothing: {expr}"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    # A syntax check that needs no server: promtool parses each query as a recording rule.
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"deliverd:dashboard:q{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(queries)
    ]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    output = run_promtool("check", "rules", str(path))
    assert f"{len(queries)} rules found" in output
