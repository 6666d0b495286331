"""nydus_py/retry.py: the one retry policy, with a fake sleep and clock (no real waiting)."""

import email.utils

import pytest

from nydus_py.errors import BackendError, BlobNotFoundError, ConfigError
from nydus_py.retry import DEFAULT_LIMIT, RetryPolicy


def failing(errors, result="ok"):
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result
    return attempt, calls


def test_transient_errors_are_retried_on_the_backoff_schedule():
    sleeps, seen = [], []
    p = RetryPolicy(limit=3, backoff=0.1, sleep=sleeps.append, rand=lambda: 0.5)
    attempt, calls = failing([BackendError("t1"), BackendError("t2")])
    assert p.call("read", attempt, on_retry=seen.append) == "ok"
    assert len(calls) == 3 and sleeps == pytest.approx([0.1, 0.2]) and len(seen) == 2


def test_gives_up_after_limit_and_never_retries_permanent_errors():
    sleeps = []
    p = RetryPolicy(limit=2, sleep=sleeps.append)
    attempt, calls = failing([BackendError(f"t{i}") for i in range(5)])
    with pytest.raises(BackendError, match="t2"):
        p.call("read", attempt)
    assert len(calls) == 3 and len(sleeps) == 2
    attempt, calls = failing([BlobNotFoundError("gone")])
    with pytest.raises(BlobNotFoundError):
        p.call("read", attempt)
    assert len(calls) == 1


def test_retry_after_wins_and_is_capped():
    sleeps = []
    err = BackendError("429")
    err.retry_after = 120.0
    p = RetryPolicy(max_retry_after=30.0, sleep=sleeps.append)
    attempt, _ = failing([err])
    p.call("read", attempt)
    assert sleeps == [30.0]


def test_retry_after_header_forms_use_the_injected_clock():
    now = 1_700_000_000.0
    p = RetryPolicy(clock=lambda: now)
    assert p.retry_after("7") == 7.0
    assert p.retry_after(email.utils.formatdate(now + 12, usegmt=True)) == pytest.approx(12.0)
    assert p.retry_after(email.utils.formatdate(now - 50, usegmt=True)) == 0.0
    assert p.retry_after("soon") is None and p.retry_after(None) is None


def test_one_set_of_defaults_and_bad_values_refused():
    assert RetryPolicy().limit == DEFAULT_LIMIT
    with pytest.raises(ConfigError):
        RetryPolicy(limit=-1)
