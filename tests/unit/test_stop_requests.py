"""SIGINT/SIGTERM while training: the first becomes a request, a second acts as it always does."""

from __future__ import annotations

import os
import signal

import pytest

from kdlib.controller.interrupt import StopRequests


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_first_signal_is_a_request_and_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with StopRequests() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)  # delivered to this (main) thread before kill returns
        assert stop.requested and stop.signal_number == sig and stop.signal_name == sig.name
        assert signal.getsignal(sig) == before  # a second one would act at once
    assert signal.getsignal(sig) == before


def test_a_second_ctrl_c_stops_at_once():
    with pytest.raises(KeyboardInterrupt):
        with StopRequests() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt
            raise AssertionError("the second SIGINT did not interrupt")
