"""SIGINT/SIGTERM while training: the first becomes a request, a second acts as it always does."""

from __future__ import annotations

import signal

import pytest

from kdlib.controller.interrupt import StopRequests


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_first_signal_is_a_request_and_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with StopRequests() as stop:
        assert not stop.requested
        signal.raise_signal(sig)  # raised in this (main) thread: handled before the next line
        assert stop.requested and stop.signal_number == sig and stop.signal_name == sig.name
        assert signal.getsignal(sig) == before  # a second one would act at once
    assert signal.getsignal(sig) == before


def test_a_second_ctrl_c_stops_at_once():
    # Python's own SIGINT handler, as in a terminal: a shell's background job (CI) starts with SIGINT
    # ignored, and StopRequests rightly gives a second signal back to whatever handled it before.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with StopRequests() as stop:
                signal.raise_signal(signal.SIGINT)
                assert stop.requested
                # Python's own handler: KeyboardInterrupt. raise_signal, not os.kill: a
                # process-directed signal may land on another thread (torch, Ray).
                signal.raise_signal(signal.SIGINT)
                raise AssertionError("the second SIGINT did not interrupt")
    finally:
        signal.signal(signal.SIGINT, previous)
