"""The retry schedule: immediate first try, doubling backoff, 4xx floor, expiry on time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deliverd.config.model import RetryConfig
from deliverd.delivery.backoff import backoff, expired, next_attempt, retry_until

M, H, D = 60, 3600, 86400
DEFAULT = RetryConfig()
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("attempts", "wait"),
    [
        (0, 0),
        (1, 15 * M),
        (2, 30 * M),
        (3, 1 * H),
        (4, 2 * H),
        (5, 4 * H),
        (6, 4 * H),
        (7, 4 * H),
        (50, 4 * H),
    ],
)
def test_default_config_backs_off_15m_30m_1h_2h_then_4h(attempts: int, wait: int) -> None:
    assert next_attempt(attempts=attempts, now=NOW, retry=DEFAULT) == NOW + wait


@pytest.mark.parametrize(
    ("retry", "attempts", "temporary_reply", "wait"),
    [
        # interval below temp_error_delay: a 4xx still waits the promised minimum...
        (RetryConfig(temp_error_delay=300, interval=60, max_interval=3600), 1, True, 300),
        (RetryConfig(temp_error_delay=300, interval=60, max_interval=3600), 3, True, 300),
        (RetryConfig(temp_error_delay=300, interval=60, max_interval=3600), 4, True, 480),
        # ...but a failure without a reply (connect refused) follows the backoff alone.
        (RetryConfig(temp_error_delay=300, interval=60, max_interval=3600), 1, False, 60),
        # max_interval below interval caps from the first retry.
        (RetryConfig(interval=900, max_interval=600), 1, True, 600),
        # temp_error_delay above max_interval wins after a 4xx.
        (RetryConfig(temp_error_delay=7200, interval=900, max_interval=3600), 9, True, 7200),
        (RetryConfig(temp_error_delay=1, interval=1, max_interval=1), 5, True, 1),
    ],
)
def test_edge_configs_follow_the_documented_rule(
    retry: RetryConfig, attempts: int, temporary_reply: bool, wait: int
) -> None:
    assert backoff(attempts=attempts, retry=retry, temporary_reply=temporary_reply) == wait


@pytest.mark.parametrize("attempts", [64, 1_000_000, 10**100])
def test_huge_attempt_counts_cap_at_max_interval_without_overflow(attempts: int) -> None:
    assert next_attempt(attempts=attempts, now=NOW, retry=DEFAULT) == NOW + 4 * H


def test_first_attempt_is_immediate_even_after_a_4xx_floor() -> None:
    assert next_attempt(attempts=0, now=NOW, retry=RetryConfig(temp_error_delay=600)) == NOW


def test_last_attempt_is_pulled_forward_to_the_expiry_moment() -> None:
    arrival = NOW - 2 * D + 30 * M  # expires in 30 minutes; the backoff says 4 hours
    when = next_attempt(attempts=9, now=NOW, retry=DEFAULT, arrival=arrival)
    assert when == arrival + 2 * D
    assert expired(arrival=arrival, now=when, retry=DEFAULT)


def test_attempt_after_expiry_is_never_scheduled_in_the_past() -> None:
    arrival = NOW - 3 * D
    assert next_attempt(attempts=3, now=NOW, retry=DEFAULT, arrival=arrival) == NOW


def test_clamp_leaves_attempts_well_before_expiry_alone() -> None:
    assert next_attempt(attempts=1, now=NOW, retry=DEFAULT, arrival=NOW) == NOW + 15 * M


@pytest.mark.parametrize(
    ("age", "is_expired"),
    [(0, False), (2 * D - 1, False), (2 * D, True), (2 * D + 1, True)],
)
def test_message_expires_exactly_expire_after_past_arrival(age: int, is_expired: bool) -> None:
    assert expired(arrival=NOW, now=NOW + age, retry=DEFAULT) is is_expired


def test_retry_until_is_arrival_plus_expire_after() -> None:
    assert retry_until(arrival=NOW, retry=RetryConfig(expire_after=3 * H)) == NOW + 3 * H


retry_configs = st.builds(
    RetryConfig,
    temp_error_delay=st.integers(1, 10 * D),
    interval=st.integers(1, 10 * D),
    max_interval=st.integers(1, 100 * D),
    expire_after=st.integers(1, 100 * D),
)


@given(retry=retry_configs, attempts=st.integers(1, 10**6), temporary=st.booleans())
def test_backoff_never_decreases_and_stays_within_bounds(
    retry: RetryConfig, attempts: int, temporary: bool
) -> None:
    wait = backoff(attempts=attempts, retry=retry, temporary_reply=temporary)
    later = backoff(attempts=attempts + 1, retry=retry, temporary_reply=temporary)
    assert later >= wait > 0
    ceiling = max(retry.max_interval, retry.temp_error_delay if temporary else 0)
    assert wait <= ceiling
    if temporary:
        assert wait >= retry.temp_error_delay


@given(
    retry=retry_configs,
    attempts=st.integers(0, 200),
    age=st.integers(0, 200 * D),
)
def test_no_attempt_is_ever_scheduled_past_expiry_when_arrival_is_known(
    retry: RetryConfig, attempts: int, age: int
) -> None:
    arrival = NOW - age
    when = next_attempt(attempts=attempts, now=NOW, retry=retry, arrival=arrival)
    assert when >= NOW
    assert when <= max(NOW, retry_until(arrival=arrival, retry=retry))
