"""The HTTP session's stream bookkeeping (pure): routing, resumption and bounds, by hypothesis."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from trio_mcp_relay.server.mcp_http.events import (
    GET_STREAM,
    KEEP_WRITTEN_EVENTS,
    MAX_FORGOTTEN,
    EventLog,
    Overflow,
    event_id,
    parse_event_id,
)
from trio_mcp_relay.server.outbox import ByteBudget


@pytest.mark.parametrize("stream, seq", [(0, 0), (3, 17), (12345, 678901)])
def test_event_ids_round_trip(stream: int, seq: int) -> None:
    assert parse_event_id(event_id(stream, seq)) == (stream, seq)


@pytest.mark.parametrize(
    "text", ["", "-", "1-", "-1", "a-1", "1-b", "1_2", "١-٢", "1-2-3", "9" * 40]
)
def test_foreign_event_ids_are_refused(text: str) -> None:
    assert parse_event_id(text) is None


def test_a_response_ends_its_stream_and_goes_nowhere_else() -> None:
    log = EventLog(100, 10_000)
    first = log.open("a", "t", sse=True)
    second = log.open("b", None, sse=True)
    assert log.route_progress("t") is first
    stream = log.route_response("a")
    assert stream is first
    log.append(stream, b"answer", final=True)
    assert first.done and not log.in_flight("a")
    # Its progress token is forgotten with it: late progress goes to a stream being read.
    assert log.route_progress("t") is log.get_stream
    second.attached = object()
    assert log.route_progress("t") is second
    # A response that no stream awaits goes nowhere (never to the GET stream).
    assert log.route_response("a") is None


def test_a_json_answer_carries_nothing_but_its_response() -> None:
    log = EventLog(100, 10_000)
    log.open("a", "t", sse=False)
    assert log.route_progress("t") is log.get_stream
    assert log.route_other() is log.get_stream


def test_unrelated_messages_prefer_the_get_stream_then_the_newest_post_stream_read() -> None:
    log = EventLog(100, 10_000)
    older = log.open("a", None, sse=True)
    newer = log.open("b", None, sse=True)
    assert log.route_other() is log.get_stream  # nobody reads the POST streams
    older.attached = object()  # only the older one is being written to a client
    assert log.route_other() is older
    newer.attached = object()
    assert log.route_other() is newer
    log.get_stream.attached = object()
    assert log.route_other() is log.get_stream


def test_written_events_are_kept_within_bounds_and_a_whole_answer_is_released() -> None:
    log = EventLog(10_000, 10_000_000)
    for n in range(KEEP_WRITTEN_EVENTS + 10):
        log.append(log.get_stream, b"n%d" % n)
    log.wrote(log.get_stream, log.get_stream.last)
    assert log.nevents == KEEP_WRITTEN_EVENTS  # the oldest written ones went
    request = log.open("r", None, sse=True, request_id=7)
    stream = log.route_response("r")
    assert stream is request
    log.append(stream, b"answer", final=True)
    log.release(stream)
    assert stream.number not in log.streams and log.forgotten[stream.number] == 7
    json_answer = log.open("j", None, sse=False)
    log.append(json_answer, b"answer", final=True)
    log.wrote(json_answer, 1, keep=False)
    assert not json_answer.events


def test_a_client_that_reads_nothing_overflows_only_on_request_streams() -> None:
    log = EventLog(4, 10_000)
    for n in range(10):  # notifications nobody listens for: the oldest make room
        log.append(log.get_stream, b"n%d" % n)
    assert [seq for seq, _ in log.get_stream.events] == [7, 8, 9, 10]
    assert log.dropped == 6
    request = log.open("r", None, sse=True)
    for n in range(4):
        log.append(request, b"p%d" % n)
    with pytest.raises(Overflow):
        log.append(request, b"one too many")
    log.wrote(request, 2)  # a writer took two: they may go now
    log.append(request, b"fits")


def test_one_event_is_taken_whatever_its_size() -> None:
    log = EventLog(1, 10)
    request = log.open("r", None, sse=True)
    assert log.append(request, b"x" * 1000) == 1


class EventLogMachine(RuleBasedStateMachine):
    """Streams opened, messages routed and appended, writers attached, writes, resumes."""

    requests = Bundle("requests")

    @initialize(max_events=st.integers(1, 12), max_bytes=st.integers(1, 400))
    def start(self, max_events: int, max_bytes: int) -> None:
        self.log = EventLog(max_events, max_bytes)
        self.counter = 0
        #: request key -> stream number, while its response is due
        self.open_requests: dict[str, int] = {}
        self.tokens: dict[str, bool] = {}
        #: every event appended: data -> (stream, seq)
        self.placed: dict[bytes, tuple[int, int]] = {}
        self.overflowed = False
        #: streams the machine itself let go (released, abandoned): they may vanish
        self.let_go: set[int] = set()
        #: the highest seq a writer took, per stream
        self.written: dict[int, int] = {}

    def _data(self, kind: str, size: int) -> bytes:
        self.counter += 1
        return f"{kind}{self.counter}:".encode() + b"x" * size

    def _append(self, stream_number: int, data: bytes, final: bool = False) -> None:
        stream = self.log.streams[stream_number]
        try:
            seq = self.log.append(stream, data, final=final)
        except Overflow:
            self.overflowed = True
            return
        self.placed[data] = (stream_number, seq)

    @precondition(lambda self: not self.overflowed)
    @rule(target=requests, sse=st.booleans(), token=st.booleans())
    def open(self, sse: bool, token: bool) -> str:
        key = f"r{self.counter}"
        self.counter += 1
        stream = self.log.open(key, f"t{key}" if token else None, sse=sse, request_id=key)
        self.open_requests[key] = stream.number
        self.tokens[key] = token
        return key

    @precondition(lambda self: not self.overflowed)
    @rule(request=consumes(requests), size=st.integers(0, 60))
    def respond(self, request: str, size: int) -> None:
        stream = self.log.route_response(request)
        expected = self.open_requests.pop(request, None)
        if expected is None or expected not in self.log.streams:
            return
        assert stream.number == expected
        self._append(stream.number, self._data("response", size), final=True)
        if not self.overflowed:
            assert self.log.streams[expected].done if expected in self.log.streams else True

    @precondition(lambda self: not self.overflowed)
    @rule(request=requests, size=st.integers(0, 60))
    def progress(self, request: str, size: int) -> None:
        stream = self.log.route_progress(f"t{request}")
        expected = self.open_requests.get(request)
        own = self.log.streams.get(expected) if expected is not None else None
        if own is not None and self.tokens[request] and own.sse and not own.done:
            assert stream is own
        else:
            assert stream.number == GET_STREAM or (stream.sse and not stream.done)
        self._append(stream.number, self._data("progress", size))

    @precondition(lambda self: not self.overflowed)
    @rule(size=st.integers(0, 60))
    def other(self, size: int) -> None:
        stream = self.log.route_other()
        if self.log.get_stream.attached is not None:
            assert stream.number == GET_STREAM
        elif stream.number != GET_STREAM:
            assert stream.sse and not stream.done
        self._append(stream.number, self._data("other", size))

    @rule(data=st.data())
    def attach_or_detach(self, data: st.DataObject) -> None:
        number = data.draw(st.sampled_from(sorted(self.log.streams)))
        stream = self.log.streams[number]
        stream.attached = None if stream.attached is not None else object()

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        number = data.draw(st.sampled_from(sorted(self.log.streams)))
        stream = self.log.streams[number]
        upto = data.draw(st.integers(0, stream.last))
        self.log.wrote(stream, upto)
        self.written[number] = max(self.written.get(number, 0), upto)

    @precondition(lambda self: not self.overflowed)
    @rule(request=consumes(requests))
    def cancel(self, request: str) -> None:
        """The client cancelled: the stream ends with an answer (as the session does)."""
        stream = self.log.cancel(request)
        expected = self.open_requests.pop(request, None)
        if expected is None or expected not in self.log.streams:
            assert stream is None or stream.number == expected
            return
        assert stream is not None and stream.number == expected
        self._append(stream.number, self._data("cancelled", 10), final=True)

    @rule(request=consumes(requests))
    def abandon(self, request: str) -> None:
        """A plain JSON answer's client left: its answer is dropped when it comes."""
        expected = self.open_requests.pop(request, None)
        self.log.abandon(request)
        if expected is not None:
            self.let_go.add(expected)
            assert expected not in self.log.streams
        assert self.log.route_response(request) is None

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        done = sorted(n for n, s in self.log.streams.items() if n and s.done and s.attached is None)
        if not done:
            return
        number = data.draw(st.sampled_from(done))
        self.log.release(self.log.streams[number])
        self.let_go.add(number)
        assert number not in self.log.streams and number in self.log.forgotten

    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        """A client resuming any stream at any seq gets that stream's later events only,
        in order, each once."""
        number = data.draw(st.sampled_from(sorted(self.log.streams)))
        stream = self.log.streams[number]
        after = data.draw(st.integers(0, stream.last))
        events = stream.after(after)
        seqs = [seq for seq, _ in events]
        assert seqs == sorted(set(seqs))
        assert all(seq > after for seq in seqs)
        for seq, payload in events:
            assert self.placed[payload] == (number, seq)

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "log"):
            return
        log = self.log
        held = [e for s in log.streams.values() for e in s.events]
        assert log.nevents == len(held)
        assert log.nbytes == sum(len(d) for _, d in held)
        if log.nevents > 1:
            assert log.nevents <= log.max_events
            assert log.nbytes <= log.max_bytes

    @invariant()
    def request_streams_lose_nothing_unwritten(self) -> None:
        if not hasattr(self, "log"):
            return
        # A request stream that vanished on its own held nothing unwritten.
        for payload, (number, seq) in self.placed.items():
            if number and number not in self.log.streams and number not in self.let_go:
                assert seq <= self.written.get(number, 0), (payload, number, seq)
        for number, stream in self.log.streams.items():
            if number == GET_STREAM:
                continue
            unwritten = [seq for seq, _ in stream.events if seq > stream.written]
            assert unwritten == list(range(stream.written + 1, stream.last + 1))


TestEventLogMachine = EventLogMachine.TestCase
TestEventLogMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_forgotten_streams_and_abandoned_answers_hold_nothing() -> None:
    log = EventLog(100, 10_000)
    for n in range(MAX_FORGOTTEN + 50):
        stream = log.open(("r", n), None, sse=True, request_id=n)
        routed = log.route_response(("r", n))
        assert routed is stream
        log.append(stream, b"answer", final=True)
        log.release(stream)
    assert len(log.forgotten) == MAX_FORGOTTEN
    assert list(log.streams) == [GET_STREAM] and log.nevents == 0 and log.nbytes == 0
    log.open("j", None, sse=False, request_id="j")
    log.abandon("j")
    assert log.route_response("j") is None
    assert log.nevents == 0 and not log.in_flight("j")


def test_held_bytes_count_against_the_relays_budget_and_come_back() -> None:
    budget = ByteBudget(100)
    log = EventLog(1000, 10_000, budget)
    other = EventLog(1000, 10_000, budget)
    request = log.open("r", None, sse=True)
    log.append(request, b"x" * 60)
    other.append(other.get_stream, b"y" * 30)
    assert budget.used == 90
    with pytest.raises(Overflow):  # the relay's budget is spent, whatever this session's bounds
        log.append(request, b"z" * 20)
    log.wrote(request, 1, keep=False)
    assert budget.used == 30
    log.append(request, b"z" * 20)
    log.clear()
    other.clear()
    assert budget.used == 0
