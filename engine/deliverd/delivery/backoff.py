"""When to try a deferred recipient again, and when to give up (pure; times are epoch seconds).

The rule, precisely:

- attempt 0 is immediate (the message is tried as soon as it is queued);
- after the Nth failed attempt (``attempts == N >= 1``) wait
  ``min(interval * 2**(N-1), max_interval)``: with the defaults 15m, 30m, 1h, 2h, 4h, 4h...;
- after a temporary *reply* (4xx) the wait is never shorter than ``temp_error_delay``, the
  minimum docs/operations.md ("Retry") promises a server that asked us to come back later; a
  failure without a reply (connect refused, timeout) follows the backoff alone;
- when the arrival time is known, no attempt is scheduled after the expiry moment
  ``arrival + expire_after``: the last attempt lands exactly on it, so a message that still
  fails then expires on time instead of up to ``max_interval`` late.
"""

from __future__ import annotations

from deliverd.config.model import RetryConfig


def backoff(*, attempts: int, retry: RetryConfig, temporary_reply: bool = True) -> int:
    """Seconds to wait after ``attempts`` failed attempts (0 for the first, immediate one)."""
    if attempts <= 0:
        return 0
    cap = max(retry.max_interval, 0)
    interval = max(retry.interval, 0)
    # Compare exponents instead of computing interval * 2**(N-1) outright: a recipient that
    # has failed for years must not build a huge integer (or overflow a float) to learn "cap".
    if interval == 0:
        wait = 0
    elif attempts - 1 >= cap.bit_length():
        wait = cap
    else:
        wait = min(interval << (attempts - 1), cap)
    if temporary_reply:
        wait = max(wait, retry.temp_error_delay)
    return wait


def retry_until(*, arrival: float, retry: RetryConfig) -> float:
    """The expiry moment: after it a still-undelivered recipient bounces (or is held)."""
    return arrival + retry.expire_after


def expired(*, arrival: float, now: float, retry: RetryConfig) -> bool:
    """True once ``now`` has reached the expiry moment."""
    return now >= retry_until(arrival=arrival, retry=retry)


def next_attempt(
    *,
    attempts: int,
    now: float,
    retry: RetryConfig,
    temporary_reply: bool = True,
    arrival: float | None = None,
) -> float:
    """Epoch time of the next attempt after ``attempts`` failed ones, ending at ``now``.

    With ``arrival`` the result is clamped to the expiry moment (but never before ``now``):
    the caller checks ``expired`` after that final attempt fails.
    """
    when = now + backoff(attempts=attempts, retry=retry, temporary_reply=temporary_reply)
    if arrival is not None:
        when = max(now, min(when, retry_until(arrival=arrival, retry=retry)))
    return when
