"""routes[]: which route a recipient takes, one precedence rule a row (pure, no sockets)."""

from __future__ import annotations

import pytest

from deliverd.config.model import RouteConfig, RouteMatch, RoutingMode, SmarthostConfig
from deliverd.delivery.routes import domain_matches, select_route, split_by_route
from deliverd.spec.route_rules import covers

RELAY = SmarthostConfig("provider.example")
BILLING = RouteConfig("billing", RouteMatch(sender_domain=("billing.example.com",)),
                      RoutingMode.SMARTHOST, RELAY)
CEO = RouteConfig("ceo", RouteMatch(sender=("CEO@example.com",)), RoutingMode.SMARTHOST, RELAY)
PARTNER = RouteConfig("partner",
                      RouteMatch(recipient_domain=("partner.example", ".partner.example")))
BILLING_TO_SHOP = RouteConfig(
    "billing-shop",
    RouteMatch(sender_domain=(".billing.example.com",), recipient_domain=("shop.example",)),
    RoutingMode.SMARTHOST, RELAY)
ROUTES = (PARTNER, CEO, BILLING_TO_SHOP, BILLING)


@pytest.mark.parametrize(("rule", "sender", "recipient", "expected"), [
    ("no route matches: the default routing", "app@example.com", "a@dest.example", None),
    ("recipient domain, exact", "app@example.com", "a@partner.example", "partner"),
    ("recipient domain, .suffix takes a subdomain", "app@example.com", "a@eu.partner.example",
     "partner"),
    ("recipient domain compares case-insensitively", "app@example.com", "a@PARTNER.Example.",
     "partner"),
    ("first match wins: the recipient route comes before the sender route",
     "x@billing.example.com", "a@partner.example", "partner"),
    ("sender address, case-insensitive", "ceo@EXAMPLE.com", "a@dest.example", "ceo"),
    ("sender domain, exact", "x@billing.example.com", "a@dest.example", "billing"),
    ("every field of a match must match (sender domain and recipient domain)",
     "x@eu.billing.example.com", "a@shop.example", "billing-shop"),
    ("a .suffix does not take the domain itself", "x@billing.example.com", "a@shop.example",
     "billing"),
    ("the null sender matches no sender condition", "", "a@dest.example", None),
    ("a sender domain route does not take another domain", "x@example.com", "a@dest.example",
     None),
])
def test_route_precedence(rule: str, sender: str, recipient: str, expected: str | None) -> None:
    route = select_route(ROUTES, sender, recipient)
    assert (route.name if route else None) == expected, rule


def test_split_by_route_groups_per_route_and_per_domain_unless_all_to_a_smart_host() -> None:
    groups = split_by_route(ROUTES, RoutingMode.DIRECT, "x@billing.example.com",
                            ["a@partner.example", "b@dest.example", "c@other.example",
                             "d@eu.partner.example"])
    assert groups == {
        ("partner", "partner.example"): ["a@partner.example"],
        ("partner", "eu.partner.example"): ["d@eu.partner.example"],
        ("billing", ""): ["b@dest.example", "c@other.example"],
    }


def test_split_by_route_without_routes_is_the_old_grouping() -> None:
    assert split_by_route((), RoutingMode.SMARTHOST, "a@x.example", ["b@y.example", "c@z.example"]
                          ) == {(None, ""): ["b@y.example", "c@z.example"]}
    assert split_by_route((), RoutingMode.DIRECT, "a@x.example", ["b@Y.example", "c@y.example"]
                          ) == {(None, "y.example"): ["b@Y.example", "c@y.example"]}


@pytest.mark.parametrize(("patterns", "domain", "expected"), [
    (["example.com"], "example.com", True),
    (["example.com"], "a.example.com", False),
    ([".example.com"], "a.example.com", True),
    ([".example.com"], "example.com", False),
    ([".example.com"], "badexample.com", False),
])
def test_domain_matches(patterns: list[str], domain: str, expected: bool) -> None:
    assert domain_matches(patterns, domain) is expected


@pytest.mark.parametrize(("earlier", "later", "hidden"), [
    ({"recipient_domain": [".example.net"]}, {"recipient_domain": ["a.example.net"]}, True),
    ({"recipient_domain": ["example.net"]}, {"recipient_domain": ["a.example.net"]}, False),
    ({"recipient_domain": ["x.example"]},
     {"recipient_domain": ["x.example"], "sender": ["u@b.example"]}, True),
    ({"recipient_domain": ["x.example"], "sender": ["u@b.example"]},
     {"recipient_domain": ["x.example"]}, False),
    ({"sender_domain": ["b.example"]}, {"sender": ["v@b.example", "w@B.example"]}, True),
    ({"sender_domain": ["b.example"]}, {"sender": ["v@b.example", "w@c.example"]}, False),
    ({"sender": ["a@b.example"]}, {"sender": ["A@B.example"]}, True),
])
def test_an_earlier_route_hides_a_later_one_only_when_it_takes_all_its_mail(
    earlier: dict[str, list[str]], later: dict[str, list[str]], hidden: bool,
) -> None:
    assert covers(earlier, later) is hidden
