"""The short profile of the fault suite (`make chaos` runs the full one), two replicas of every
part: a few hundred orders under load while a processor and the order_service replica whose relay
leads are killed with SIGKILL and restarted, that replica is stopped with SIGTERM and restarted,
the relay leader is paused (SIGSTOP) past its lease and woken, and the leader's producer is fenced
(a fatal Kafka error); both topics and the database are then checked order by order."""

from __future__ import annotations

from chaos.suite import PROFILES, run_suite


def test_killed_parts_lose_nothing_and_apply_nothing_twice(database_url: str) -> None:
    fault_names, orders_per_fault = PROFILES["short"]

    outcomes = run_suite(fault_names, orders_per_fault, on_outcome=lambda _: None)

    assert [o.fault for o in outcomes] == fault_names
    for outcome in outcomes:
        assert outcome.acknowledged == orders_per_fault, outcome
        assert outcome.lost == 0, outcome
        assert outcome.duplicate_effects == 0, outcome
        assert outcome.reordered == 0, outcome
        assert outcome.abandoned == 0, outcome
        # A killed server is UNAVAILABLE to its callers, a stopping one may cancel calls it had not
        # started, a paused one lets them time out, one whose pipeline is behind sheds calls (all
        # retried); never INTERNAL or UNKNOWN.
        expected = {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
        assert set(outcome.failed_attempts) <= expected, outcome
