"""NATS JetStream queue: work-queue stream, one pull consumer per queue and priority band.

Storage layout: one stream ``<S>`` (``stream=``, default ``OMNIQ``), work-queue
retention, file storage, one message per subject, message schedules and
per-message TTL (nats-server 2.12+). Every subject of a task ends with its id,
so ``<S>.*.*.*.<id>`` is everything the server knows about one task and the
newest message on it is the task's state::

    <S>.r.<q>.<p>.<id>   ready: the task's work message (a record with status pending)
    <S>.s.<q>.<p>.<id>   scheduled: an "@at <due>" Nats-Schedule whose target is the r subject
    <S>.t.<q>.<p>.<id>   record: running, succeeded, cancelled or expired (with a TTL)
    <S>.u.<q>.<p>.<id>   released: given back unstarted, waiting for its redelivery
    <S>.f.<q>.<p>.<id>   dead letter: failed for good, kept until re-queued

``<q>`` is the queue name and ``<id>`` the task id as subject tokens (see
``omniq._nats.token``), ``<p>`` the priority. Every body is a ``_Record``.

Consumers: one durable pull consumer ``r~<q>~<p>`` (filter ``<S>.r.<q>.<p>.*``,
explicit ack) per queue and priority band, shared by every worker of the
queue; its AckWait is the lease.

How the contract maps onto JetStream:

* enqueue publishes the r (or s) message once, with ``Nats-Msg-Id`` and an
  expected last sequence of 0 on ``<S>.*.*.*.<id>``: idempotent for as long as
  the server holds anything of the task, beyond the stream's duplicate window;
* a claim pulls from the bands of each queue in order, highest priority first
  (the order is decided per claim from what each pull returns), then writes the
  running record with an expected last sequence equal to the work message's:
  that compare-and-set is what makes cancel, takeover after a lost lease and a
  stale ack exclusive, since JetStream itself accepts a stale delivery's ack;
* the lease is the consumer's AckWait, renewed by ``+WPI``; ack is ``+ACK``;
  redelivery after AckWait is the server's; retries and etas are server-side
  message schedules; release is ``-NAK`` (the task keeps its place);
* waiting is a pull request per band, held by the server until work arrives,
  plus the server's consumer-created advisories for bands that appear.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import msgspec

from .._errors import ConfigurationError
from .._nats import (
    CONSUMER_EXISTS,
    NO_MESSAGE_FOUND,
    Connector,
    JetStreamError,
    Link,
    Outgoing,
    PubAck,
    Stored,
    nats_settings,
    parse_url,
    rfc3339,
    status_of,
    stream_name,
    token,
)
from .._nats_blocking import BlockingPublisher, can_log_in
from .._task import TaskStatus
from .base import LeaseRef, NewRow, StoredRow, TaskQueue

if TYPE_CHECKING:
    import ssl

    from nats.aio.msg import Msg

    from ..results.nats import NATSResultStorage

log = logging.getLogger("omniq.queue.nats")

RUNNING, PENDING = TaskStatus.RUNNING.value, TaskStatus.PENDING.value
_NS = 1_000_000_000
#: A delivery that waited unclaimed in a pull buffer longer than this share of
#: AckWait is given back (NAK) rather than started on a shortened lease.
_FRESH_SHARE = 0.25
#: How long a claim's pull waits for a message the consumer has not counted yet.
_CLAIM_GRACE = 0.005
#: Longest pull request held open by the server while waiting for work.
_MAX_WAIT_PULL = 30.0
#: How often the list of bands is re-read even without an advisory.
_BANDS_MAX_AGE = 30.0
_LIST_PAGE = 256
_SERVER_VERSION = (2, 12)
_CHECK = "Nats-Expected-Last-Subject-Sequence"
_CHECK_ON = "Nats-Expected-Last-Subject-Sequence-Subject"


class _Record(msgspec.Struct, array_like=True, omit_defaults=True):
    """The body of every message of a task: its payload and state."""

    id: str
    status: str
    attempts: int
    due_at: float
    payload: bytes
    error: str | None = None
    #: For running and released records: the work message's stream sequence,
    #: its delivery count (the lease's generation) and its ack subject.
    work: int = 0
    delivered: int = 0
    reply: str = ""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Record).decode


class _Lease(NamedTuple):
    """What a ``lease_id`` carries: enough to finish a task from any instance."""

    record: int  # stream sequence of the running record
    work: int
    delivered: int
    queue: str  # queue token
    priority: int
    reply: str

    def __str__(self) -> str:
        return (
            f"{self.record}:{self.work}:{self.delivered}:{self.queue}:{self.priority}:{self.reply}"
        )

    @classmethod
    def parse(cls, text: str) -> _Lease:
        record, work, delivered, queue, priority, reply = text.split(":", 5)
        return cls(int(record), int(work), int(delivered), queue, int(priority), reply)


Q = TypeVar("Q", bound="NATSTaskQueue")
P = ParamSpec("P")
T = TypeVar("T")


def _fenced(
    method: Callable[Concatenate[Q, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Q, P], Coroutine[Any, Any, T]]:
    """Mark a write as in flight while it runs, for reads behind ``_fence``."""

    async def write(self: Q, /, *args: P.args, **kwargs: P.kwargs) -> T:
        done = asyncio.get_running_loop().create_future()
        self._writing.add(done)
        try:
            return await method(self, *args, **kwargs)
        finally:
            self._writing.discard(done)
            done.set_result(None)

    write.__name__, write.__doc__ = method.__name__, method.__doc__
    return write


def _ack_info(reply: str) -> tuple[int, int, int]:
    """(delivery count, stream sequence, pending after it) from a JetStream ack subject."""
    parts = reply.split(".")
    if len(parts) == 9:  # $JS.ACK.<stream>.<consumer>.<dc>.<sseq>.<cseq>.<ts>.<pending>
        return int(parts[4]), int(parts[5]), int(parts[8])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<dc>.<sseq>.<cseq>.<ts>.<pending>[.<x>]
    return int(parts[6]), int(parts[7]), int(parts[10])


def _window(bands: Sequence[_Band], start: int, need: int) -> list[_Band]:
    """Bands from ``start`` until, by what they last said they hold, ``need`` is covered."""
    window: list[_Band] = []
    expected = 0
    for band in bands[start:]:
        if window and expected >= need:
            break
        window.append(band)
        expected += len(band.buffer) + band.hint
    return window


def _pop(band: _Band, taken: list[Msg], limit: int) -> None:
    while len(taken) < limit and band.buffer:
        taken.append(band.buffer.popleft()[0])


def _idle(band: _Band) -> bool:
    """Nothing buffered, nothing left at the last delivery, and a wait pull out."""
    return not band.buffer and band.hint == 0 and band.wait_pull is not None


# -- per-connection state ------------------------------------------------------------------
class _Pull:
    __slots__ = ("batch", "future", "got")

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.got = 0
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def end(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


@dataclass(eq=False)
class _Band:
    """One band consumer as one connection sees it, with deliveries not claimed yet."""

    index: int
    name: str
    queue: str
    priority: int
    ack_wait: float
    buffer: deque[tuple[Msg, float]] = field(default_factory=deque)
    #: Messages the server said were left after our last delivery (0: maybe empty).
    hint: int = 0
    pulls: dict[int, _Pull] = field(default_factory=dict)
    #: Our outstanding wait pull (the server holds it until work comes) and its end.
    wait_pull: int | None = None
    waiting_until: float = 0.0


class _State:
    """What one connection knows: the bands, and the numbers it has used."""

    def __init__(self) -> None:
        self.bands: dict[str, _Band] = {}
        self.by_index: dict[int, _Band] = {}
        self.by_queue: dict[str, list[_Band]] = {}
        self.valid_until = 0.0
        self.invalidations = 0
        self.listing: asyncio.Future[list[dict[str, Any]]] | None = None
        self.lease_checked: set[str] = set()
        self.numbers = iter(range(1 << 62))
        self.lock = asyncio.Lock()

    async def add(
        self, link: Link, name: str, queue: str, priority: int, ack_wait: float, on_delivery: Any
    ) -> None:
        """Note a band, listening to its deliveries before anyone can pull from it."""
        async with self.lock:
            band = self.bands.get(name)
            if band is not None:
                band.ack_wait = ack_wait
                return
            band = _Band(next(self.numbers), name, queue, priority, ack_wait)
            await link.listen(f"p.{band.index}", lambda msg: on_delivery(link, band, msg))
            self.bands[name] = band
            self.by_index[band.index] = band
            ranked = self.by_queue.setdefault(queue, [])
            ranked.append(band)
            ranked.sort(key=lambda b: -b.priority)


class NATSTaskQueue(TaskQueue):
    """Tasks in a NATS JetStream stream, shared by every process that connects to it.

    ``servers`` is one URL or a list (a cluster); ``user``/``password``,
    ``token`` or ``creds`` (a ``.creds`` file) log in, ``tls`` is an
    ``ssl.SSLContext`` (or True). ``stream`` names the stream, so several
    applications can share one server. ``retention_seconds``: how long
    succeeded, cancelled and expired tasks stay visible to ``get_task`` (the
    server drops them then, by message TTL); failed ones stay until re-queued.
    ``duplicate_window``: the stream's ``Nats-Msg-Id`` window (seconds), set
    when the stream is created; ids stay unique beyond it for as long as the
    server holds the task. ``retry_timeout``: how long an operation rides out a
    server restart. Needs nats-server 2.12 or later (message schedules).
    """

    schemes = ("nats",)
    #: A known band's enqueue is published from the caller's thread (``_put_blocking``).
    supports_blocking_put = True

    def __init__(
        self,
        servers: str | Sequence[str] = ("nats://localhost:4222",),
        *,
        stream: str = "OMNIQ",
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
        name: str | None = None,
        replicas: int = 1,
        retention_seconds: float = 3600.0,
        duplicate_window: float = 120.0,
        retry_timeout: float = 30.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.settings = nats_settings(
            servers, user=user, password=password, token=token, creds=creds, tls=tls,
            name=name, retry_timeout=retry_timeout,
        )  # fmt: skip
        self.stream = stream_name(stream, "stream")
        if retention_seconds < 1:
            raise ConfigurationError("retention_seconds must be at least 1 (message TTLs are)")
        if replicas < 1:
            raise ConfigurationError("replicas must be at least 1")
        if duplicate_window <= 0:
            raise ConfigurationError("duplicate_window must be positive")
        self.retention_seconds = retention_seconds
        self.duplicate_window = duplicate_window
        self.replicas = replicas
        self._connector = Connector(self.settings, self._setup, self._release_buffers)
        self._blocking = BlockingPublisher(self.settings) if can_log_in(self.settings) else None
        #: Bands whose consumer exists (made or seen by ``_ensure_bands``): the sync
        #: facade's enqueue publishes to those without an event loop.
        self._bands_made: set[tuple[str, int]] = set()
        #: Running records of the leases this instance handed out, by lease id.
        self._held: dict[str, _Record] = {}
        #: Writes in flight (see ``_fence``).
        self._writing: set[asyncio.Future[None]] = set()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> NATSTaskQueue:
        servers, credentials, query = parse_url(url, ("stream",))
        return cls(servers, **{**credentials, **query, **options})

    def default_result_storage(self) -> NATSResultStorage:
        """Results in a key-value bucket on the same servers (``OmniQ("nats://…")``)."""
        from ..results.nats import NATSResultStorage

        return NATSResultStorage._for(self.settings, f"{self.stream}_RESULTS")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.settings)!r}, stream={self.stream!r})"

    # -- subjects -------------------------------------------------------------------------
    def _subject(self, kind: str, queue: str, priority: int, task: str) -> str:
        return f"{self.stream}.{kind}.{queue}.{priority}.{task}"

    def _everything(self, task_id: str) -> str:
        return f"{self.stream}.*.*.*.{token(task_id)}"

    def _after(self, seq: int, task_id: str) -> dict[str, str]:
        """Headers making a publish a compare-and-set on the task's newest message."""
        return {_CHECK: str(seq), _CHECK_ON: self._everything(task_id)}

    # -- connection setup ---------------------------------------------------------------------
    async def _link(self) -> Link:
        return await self._connector.link()

    async def _setup(self, link: Link) -> None:
        version = link.nc.connected_server_version
        if (version.major, version.minor) < _SERVER_VERSION:
            raise ConfigurationError(
                f"NATSTaskQueue needs nats-server 2.12 or later (message schedules); "
                f"{self.settings} runs {version}"
            )
        state = _State()
        link.ext = state
        link.on_reconnect.append(lambda: self._forget_pulls(state))
        for event in ("CREATED", "DELETED"):
            await link.nc.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.{event}.{self.stream}.*", cb=self._advisory(link)
            )
        await self._ensure_stream(link)

    def _advisory(self, link: Link) -> Any:
        async def on_advisory(msg: Msg) -> None:
            self._invalidate(link.ext)  # a band appeared or went: list them again
            link.ring()

        return on_advisory

    @staticmethod
    def _invalidate(state: _State) -> None:
        state.valid_until = 0.0
        state.invalidations += 1

    def _forget_pulls(self, state: _State) -> None:
        """After a reconnect the server knows none of our pull requests."""
        for band in state.bands.values():
            for pull in band.pulls.values():
                pull.end()
            band.pulls.clear()
            band.wait_pull, band.waiting_until = None, 0.0
        self._invalidate(state)

    async def _ensure_stream(self, link: Link) -> None:
        config = {
            "name": self.stream,
            "subjects": [f"{self.stream}.>"],
            "retention": "workqueue",
            "storage": "file",
            "num_replicas": self.replicas,
            "max_msgs_per_subject": 1,
            "discard": "old",
            "allow_direct": True,
            "allow_rollup_hdrs": True,
            "allow_msg_ttl": True,
            "allow_msg_schedules": True,
            "duplicate_window": int(self.duplicate_window * _NS),
        }
        found = await link.ensure_stream(config, f"stream {self.stream}")
        if found is None:
            return
        wrong = [
            key
            for key in ("retention", "max_msgs_per_subject", "allow_msg_schedules", "allow_direct")
            if found.get(key, False) != config[key]
        ]
        if wrong:
            raise ConfigurationError(
                f"stream {self.stream!r} exists but is not an OmniQ queue stream "
                f"(differs in {', '.join(wrong)}); choose another stream= name"
            )

    # -- consumers --------------------------------------------------------------------------
    def _band_config(self, name: str, queue: str, priority: int) -> dict[str, Any]:
        return {
            "durable_name": name,
            "filter_subject": f"{self.stream}.r.{queue}.{priority}.*",
            "ack_policy": "explicit",
            "ack_wait": int(self.lease_seconds * _NS),
            "deliver_policy": "all",
            "max_deliver": -1,
            "max_ack_pending": -1,
        }

    async def _create_consumer(
        self, link: Link, name: str, config: dict[str, Any], action: str = "create"
    ) -> dict[str, Any]:
        request = {"stream_name": self.stream, "config": config, "action": action}
        answer = await link.api(f"CONSUMER.CREATE.{self.stream}.{name}", request, check=False)
        error = answer.get("error")
        if error is None:
            return answer
        if error.get("err_code") == CONSUMER_EXISTS:
            return await link.api(f"CONSUMER.INFO.{self.stream}.{name}")
        raise JetStreamError(f"consumer {name}", error)

    async def _ensure_bands(self, link: Link, bands: Iterable[tuple[str, int]]) -> None:
        """Producers create a band's consumer before its first task, so waiters see it."""
        state: _State = link.ext
        bands = set(bands)
        missing = sorted({(q, p) for q, p in bands if f"r~{q}~{p}" not in state.bands})
        infos = await asyncio.gather(
            *(self._create_consumer(link, f"r~{q}~{p}", self._band_config(f"r~{q}~{p}", q, p))
              for q, p in missing)
        )  # fmt: skip
        for (q, p), info in zip(missing, infos, strict=True):
            await self._add_band(link, f"r~{q}~{p}", q, p, info["config"]["ack_wait"] / _NS)
        self._bands_made.update(bands)

    async def _add_band(
        self, link: Link, name: str, queue: str, priority: int, ack_wait: float
    ) -> None:
        await link.ext.add(link, name, queue, priority, ack_wait, self._delivered)

    async def _bands(self, link: Link, queues: Sequence[str]) -> list[_Band]:
        """The band consumers of ``queues``: queues in order, then highest priority first."""
        state: _State = link.ext
        if time.monotonic() >= state.valid_until:
            await self._list_consumers(link)
        return [band for q in queues for band in state.by_queue.get(token(q), ())]

    async def _list_consumers(self, link: Link) -> list[dict[str, Any]]:
        """Every consumer of the stream (with its counts); refreshes the band list.

        Concurrent callers share one listing: a claim never sees a half-read list.
        """
        state: _State = link.ext
        listing = state.listing
        if listing is None:
            listing = state.listing = asyncio.ensure_future(self._read_consumers(link))
            listing.add_done_callback(lambda _: setattr(state, "listing", None))
        return await asyncio.shield(listing)

    async def _read_consumers(self, link: Link) -> list[dict[str, Any]]:
        state: _State = link.ext
        valid_until = time.monotonic() + _BANDS_MAX_AGE
        generation = state.invalidations
        infos: list[dict[str, Any]] = []
        while True:
            page = await link.api(f"CONSUMER.LIST.{self.stream}", {"offset": len(infos)})
            infos += page.get("consumers") or []
            if len(infos) >= page.get("total", 0) or not page.get("consumers"):
                break
        for info in infos:
            kind, _, rest = info["name"].partition("~")
            queue, _, priority = rest.rpartition("~")
            if kind == "r" and queue:
                ack_wait = info["config"]["ack_wait"] / _NS
                await self._add_band(link, info["name"], queue, int(priority), ack_wait)
        if state.invalidations == generation:  # no advisory came while listing
            state.valid_until = valid_until
        return infos

    async def _check_lease(self, link: Link, band: _Band) -> None:
        """A claimer makes the band's AckWait its ``lease_seconds`` (once per connection)."""
        state: _State = link.ext
        if band.name in state.lease_checked:
            return
        state.lease_checked.add(band.name)
        if abs(band.ack_wait - self.lease_seconds) < 1e-3:
            return
        log.warning(
            "queue band %s had a lease (AckWait) of %s s; setting it to this worker's %s s",
            band.name, band.ack_wait, self.lease_seconds,
        )  # fmt: skip
        config = self._band_config(band.name, band.queue, band.priority)
        await self._create_consumer(link, band.name, config, action="update")
        band.ack_wait = self.lease_seconds

    # -- pulls ------------------------------------------------------------------------------
    def _delivered(self, link: Link, band: _Band, msg: Msg) -> None:
        """A pull's delivery (buffered until claimed) or status (the pull is over)."""
        status = status_of(msg)
        if status is None:
            band.buffer.append((msg, time.monotonic()))
            band.hint = _ack_info(msg.reply)[2]
            link.ring()
            # The server serves a consumer's pull requests in order.
            for number, pull in band.pulls.items():
                if pull.got < pull.batch:
                    pull.got += 1
                    if pull.got == pull.batch:
                        self._end_pull(band, number)
                    break
            return
        if status == "100":  # idle heartbeat
            return
        if status in ("404", "408"):
            band.hint = 0
        elif status == "409":  # consumer deleted, leadership change, …: list again
            self._invalidate(link.ext)
            link.ring()
        self._end_pull(band, int(msg.subject.rsplit(".", 1)[1]))

    def _end_pull(self, band: _Band, number: int) -> None:
        pull = band.pulls.pop(number, None)
        if pull is not None:
            pull.end()
        if number == band.wait_pull:
            band.wait_pull, band.waiting_until = None, 0.0

    async def _pull(self, link: Link, band: _Band, batch: int, expires: float | None) -> int:
        number: int = next(link.ext.numbers)
        pull = _Pull(batch)
        band.pulls[number] = pull
        request: dict[str, Any] = {"batch": batch}
        if expires is None:
            # "No wait" answers from the consumer's count of pending messages,
            # which trails a just-stored message by a moment: a short expiry
            # lets such a message still come (the pull ends as soon as the
            # band has nothing more to give).
            request["no_wait"] = True
            expires = _CLAIM_GRACE
        request["expires"] = int(expires * _NS)
        await link.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{band.name}",
            msgspec.json.encode(request),
            reply=link.reply_to("p", band.index, number),
        )
        return number

    async def _fetch(self, link: Link, band: _Band, batch: int) -> None:
        """Pull up to ``batch`` available messages into the band's buffer (no waiting)."""
        await self._check_lease(link, band)
        number = await self._pull(link, band, batch, None)
        pull = band.pulls[number]
        done, _ = await asyncio.wait({pull.future}, timeout=5.0)
        if not done:
            log.debug("pull from %s got no answer", band.name)
            self._end_pull(band, number)

    async def _arm(self, link: Link, band: _Band, expires: float) -> None:
        band.wait_pull = await self._pull(link, band, 1, expires)
        band.waiting_until = time.monotonic() + expires + 1.0

    def _sweep(self, state: _State) -> list[str]:
        """Take stale deliveries out of the buffers; the ones still ours go back (NAK).

        A delivery that waited too long to be leased with most of its AckWait
        left is given back; one past (nearly) all of it is dropped without a
        word, since the server may have handed it to someone else already and
        an ack, even a NAK, names the message, not the delivery.
        """
        now = time.monotonic()
        giveback = []
        for band in state.bands.values():
            buffer = band.buffer
            while buffer and now - buffer[0][1] > band.ack_wait * _FRESH_SHARE:
                msg, at = buffer.popleft()
                if now - at < band.ack_wait * 0.8:
                    giveback.append(msg.reply)
        return giveback

    async def _take(self, link: Link, bands: Sequence[_Band], limit: int) -> list[Msg]:
        """Up to ``limit`` deliveries, in band order, fetching as little as possible.

        Bands are pulled concurrently, starting at the first one not known to
        be able to fill the claim by itself; what lower bands returned beyond
        the claim goes back to the server at once (NAK keeps its place).
        """
        taken: list[Msg] = []
        giveback = self._sweep(link.ext)
        i = 0
        while len(taken) < limit and i < len(bands):
            need = limit - len(taken)
            if bands[i].buffer and bands[i].hint == 0:
                # All the band had when it last delivered is here: take it and
                # stop (fewer tasks, never a lower band's ahead of a newer one).
                _pop(bands[i], taken, limit)
                break
            window = _window(bands, i, need)
            i += len(window)
            if i == len(bands):
                # Bands at the end that the server already holds a pull of ours
                # for, and that had nothing more, would answer "nothing": their
                # next message comes to that pull.
                while window and _idle(window[-1]):
                    window.pop()
                if not window:
                    break
            await asyncio.gather(
                *(self._fetch(link, b, need - len(b.buffer)) for b in window
                  if len(b.buffer) < need)
            )  # fmt: skip
            for n, band in enumerate(window):
                _pop(band, taken, limit)
                if len(taken) >= limit:
                    for later in window[n + 1 :]:
                        giveback += [m.reply for m, _ in later.buffer]
                        later.buffer.clear()
                    break
        if giveback:
            await self._nak(link, giveback)
        return taken

    async def _nak(self, link: Link, replies: Sequence[str]) -> None:
        """Give deliveries back at their place, and wait until the server has them."""
        await link.request_many([Outgoing(reply, b"-NAK") for reply in replies])

    async def _release_buffers(self, link: Link) -> None:
        """On close: deliveries pulled but never claimed go back to the server."""
        state: _State | None = link.ext
        if state is None or not link.nc.is_connected:
            return
        replies = self._sweep(state)
        for band in state.bands.values():
            replies += [m.reply for m, _ in band.buffer]
            band.buffer.clear()
        for reply in replies:
            await link.nc.publish(reply, b"-NAK")
        if replies:
            await link.nc.flush(timeout=2)

    # -- primitives -------------------------------------------------------------------------
    @_fenced
    async def _put(self, rows: Sequence[NewRow]) -> list[bool]:
        link = await self._link()
        await self._ensure_bands(link, {(token(row.queue), row.priority) for row in rows})
        now = time.time()
        acks = await link.publish_many([self._enqueue_message(row, now) for row in rows])
        return [self._inserted(ack) for ack in acks]

    def _put_blocking(self, rows: Sequence[NewRow]) -> list[bool] | None:
        """``_put`` on this thread's plain socket, once the rows' bands have consumers.

        None (use the event loop) before that: creating a band's consumer, and the
        stream, stays with the async path.
        """
        if self._blocking is None:
            return None
        if not {(token(row.queue), row.priority) for row in rows} <= self._bands_made:
            return None
        now = time.time()
        acks = self._blocking.publish_many([self._enqueue_message(row, now) for row in rows])
        return [self._inserted(ack) for ack in acks]

    def _enqueue_message(self, row: NewRow, now: float) -> Outgoing:
        task, queue = token(row.id), token(row.queue)
        body = _encode(_Record(row.id, PENDING, 0, row.due_at, row.payload))
        headers = {"Nats-Msg-Id": task, **self._after(0, row.id)}
        ready = self._subject("r", queue, row.priority, task)
        if row.due_at <= now:
            return Outgoing(ready, body, headers)
        headers["Nats-Schedule"] = "@at " + rfc3339(row.due_at)
        headers["Nats-Schedule-Target"] = ready
        return Outgoing(self._subject("s", queue, row.priority, task), body, headers)

    @staticmethod
    def _inserted(ack: PubAck) -> bool:
        if ack.error is not None:
            if ack.conflict:
                return False
            raise JetStreamError("enqueue", ack.error)
        return not ack.duplicate

    async def _claim(
        self, queues: Sequence[str], limit: int, now: float, lease_until: float, lease_id: str
    ) -> list[StoredRow]:
        link = await self._link()
        if not link.up:
            return []  # riding out a reconnect: nothing can be leased meanwhile
        bands = await self._bands(link, queues)
        deliveries = await self._take(link, bands, limit)
        return await self._lease(link, deliveries) if deliveries else []

    async def _lease(self, link: Link, deliveries: Sequence[Msg]) -> list[StoredRow]:
        """Write the running record of each delivery, compare-and-set on the work message."""
        pending: list[tuple[_Record, Outgoing]] = []
        for msg in deliveries:
            delivered, seq, _ = _ack_info(msg.reply)
            try:
                work = _decode(msg.data)
            except msgspec.DecodeError:
                log.error("dropped a message that is not an OmniQ task on %s", msg.subject)
                await link.nc.publish(msg.reply, b"+TERM not an OmniQ task")
                continue
            record = msgspec.structs.replace(
                work, status=RUNNING, attempts=work.attempts + 1, work=seq,
                delivered=delivered, reply=msg.reply,
            )  # fmt: skip
            _, _, queue, priority, task = msg.subject.split(".")
            subject = self._subject("t", queue, int(priority), task)
            pending.append((record, Outgoing(subject, _encode(record), self._after(seq, work.id))))
        acks = await link.publish_many([out for _, out in pending])
        rows: list[StoredRow | None] = []
        retry: list[tuple[int, _Record]] = []
        for (record, out), ack in zip(pending, acks, strict=True):
            if ack.error is None:
                rows.append(self._row(out.subject, ack.seq, record))
            elif ack.conflict:
                retry.append((len(rows), record))
                rows.append(None)
            else:
                raise JetStreamError("claim", ack.error)
        if retry:
            taken = await asyncio.gather(*(self._takeover(link, r) for _, r in retry))
            for (index, _), row in zip(retry, taken, strict=True):
                rows[index] = row
        return [row for row in rows if row is not None]

    def _row(self, subject: str, seq: int, record: _Record) -> StoredRow:
        _, _, queue, priority, _ = subject.split(".")
        lease = str(_Lease(seq, record.work, record.delivered, queue, int(priority), record.reply))
        self._held[lease] = record
        return StoredRow(
            record.id, record.payload, TaskStatus.RUNNING, record.attempts, record.due_at,
            lease, record.error,
        )  # fmt: skip

    async def _takeover(self, link: Link, record: _Record) -> StoredRow | None:
        """The slow path of a claim: the work message is not the task's newest message.

        Its running record is older than this delivery (the lease ran out and
        the server redelivered), or it was released: lease it anew. Otherwise
        the delivery is stale: the task was finished, cancelled or scheduled
        again (drop the delivery), or another worker holds it (leave it alone).
        """
        newest = await link.get_last(self.stream, self._everything(record.id))
        kind = newest.subject.split(".")[1] if newest else ""
        current = _decode(newest.data) if newest else None
        if newest is None or current is None or current.work != record.work:
            await link.nc.publish(record.reply, b"+TERM superseded")
            return None
        if kind == "t" and current.status == RUNNING and current.delivered >= record.delivered:
            return None  # a later delivery of it is running elsewhere
        if not (kind == "u" or (kind == "t" and current.status == RUNNING)):
            await link.nc.publish(record.reply, b"+TERM superseded")
            return None
        leased = msgspec.structs.replace(
            record, attempts=current.attempts + 1, error=current.error, due_at=current.due_at
        )
        subject = newest.subject.replace(f"{self.stream}.{kind}.", f"{self.stream}.t.", 1)
        [ack] = await link.publish_many(
            [Outgoing(subject, _encode(leased), self._after(newest.seq, record.id))]
        )
        if ack.error is not None:
            return None
        if kind == "u":
            await self._delete(link, [newest.seq])
        return self._row(subject, ack.seq, leased)

    def _wake_generation(self) -> int:
        link = self._connector.current()
        return 0 if link is None else link.generation

    async def _wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        link = await self._link()
        if link.generation != since:
            return
        if not link.up:
            await link.until_up(timeout)
            return
        expires = min(max(timeout, 0.01), _MAX_WAIT_PULL)
        now = time.monotonic()
        for band in await self._bands(link, queues):
            if band.waiting_until <= now and not band.buffer:
                await self._check_lease(link, band)
                await self._arm(link, band, expires)
        await link.changed(since, timeout)

    @_fenced
    async def _finish(
        self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None
    ) -> list[bool]:
        link = await self._link()
        held = await self._resolve(link, refs)
        outgoing: list[Outgoing] = []
        for ref, (lease, record) in zip(refs, held, strict=True):
            if lease is None or record is None:
                outgoing.append(Outgoing("", b""))
                continue
            final = msgspec.structs.replace(record, status=status.value, error=error)
            kind = "f" if status is TaskStatus.FAILED else "t"
            headers = self._after(lease.record, ref.id)
            if kind == "t":
                headers["Nats-TTL"] = str(int(self.retention_seconds))
            subject = self._subject(kind, lease.queue, lease.priority, token(ref.id))
            outgoing.append(Outgoing(subject, _encode(final), headers))
        sent = [o for o in outgoing if o.subject]
        acks = iter(await link.publish_many(sent))
        done: list[bool] = []
        cleanup: list[int] = []
        verb = b"+ACK" if status is TaskStatus.SUCCEEDED else b"+TERM " + status.value.encode()
        for out, (lease, _) in zip(outgoing, held, strict=True):
            ok = bool(out.subject) and next(acks).error is None
            done.append(ok)
            if ok and lease is not None:
                await link.nc.publish(lease.reply, verb)
                if status is TaskStatus.FAILED:
                    cleanup.append(lease.record)  # the running record, now superseded
        if cleanup:
            await self._delete(link, cleanup)
        return done

    async def _resolve(
        self, link: Link, refs: Sequence[LeaseRef]
    ) -> list[tuple[_Lease | None, _Record | None]]:
        """The lease and running record of each ref (ours from memory, others' read back)."""
        out: list[tuple[_Lease | None, _Record | None]] = []
        for ref in refs:
            if ref.lease_id is None:
                out.append(await self._current_lease(link, ref.id))
                continue
            try:
                lease = _Lease.parse(ref.lease_id)
            except ValueError:
                out.append((None, None))
                continue
            record = self._held.pop(ref.lease_id, None)
            if record is None:
                found = await link.direct_get(self.stream, {"seq": lease.record}, single=True)
                record = _decode(found[0].data) if found else None
            out.append((lease, record))
        return out

    async def _current_lease(
        self, link: Link, task_id: str
    ) -> tuple[_Lease | None, _Record | None]:
        newest = await link.get_last(self.stream, self._everything(task_id))
        if newest is None or newest.subject.split(".")[1] != "t":
            return None, None
        record = _decode(newest.data)
        if record.status != RUNNING:
            return None, None
        _, _, queue, priority, _ = newest.subject.split(".")
        lease = _Lease(
            newest.seq, record.work, record.delivered, queue, int(priority), record.reply
        )
        return lease, record

    @_fenced
    async def _retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        link = await self._link()
        [(lease, record)] = await self._resolve(link, [ref])
        if lease is None or record is None:
            return False
        task = token(ref.id)
        again = _Record(record.id, PENDING, record.attempts, due_at, record.payload, error)
        ready = self._subject("r", lease.queue, lease.priority, task)
        headers = self._after(lease.record, ref.id)
        subject = ready
        if due_at > time.time():
            headers["Nats-Schedule"] = "@at " + rfc3339(due_at)
            headers["Nats-Schedule-Target"] = ready
            subject = self._subject("s", lease.queue, lease.priority, task)
        [ack] = await link.publish_many([Outgoing(subject, _encode(again), headers)])
        if ack.error is not None:
            return False
        await link.nc.publish(lease.reply, b"+ACK")  # this delivery is done with
        return True

    @_fenced
    async def _release(self, refs: Sequence[LeaseRef]) -> None:
        link = await self._link()
        held = await self._resolve(link, refs)
        outgoing, replies = [], []
        for ref, (lease, record) in zip(refs, held, strict=True):
            if lease is None or record is None:
                continue
            back = msgspec.structs.replace(record, status=PENDING, attempts=record.attempts - 1)
            subject = self._subject("u", lease.queue, lease.priority, token(ref.id))
            outgoing.append(Outgoing(subject, _encode(back), self._after(lease.record, ref.id)))
            replies.append(lease.reply)
        acks = await link.publish_many(outgoing)
        await self._nak(link, [r for r, a in zip(replies, acks, strict=True) if a.error is None])

    async def _extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        link = await self._link()
        newest = await asyncio.gather(
            *(link.get_last(self.stream, self._everything(ref.id)) for ref in refs)
        )
        extended = []
        for ref, found in zip(refs, newest, strict=True):
            try:
                lease = _Lease.parse(ref.lease_id or "")
            except ValueError:
                extended.append(False)
                continue
            ok = found is not None and found.seq == lease.record
            if ok:
                await link.nc.publish(lease.reply, b"+WPI")
            extended.append(ok)
        return extended

    @_fenced
    async def _cancel(self, task_id: str) -> bool:
        link = await self._link()
        for _ in range(5):
            found = await link.direct_get(
                self.stream, {"multi_last": [self._everything(task_id)], "batch": 16}
            )
            if not found:
                return False
            newest = max(found, key=lambda m: m.seq)
            kind = newest.subject.split(".")[1]
            if kind not in ("r", "s", "u"):
                return False
            if kind == "s":
                # Overwrite the schedule first: the server can no longer fire it.
                [ack] = await link.publish_many(
                    [Outgoing(newest.subject, newest.data, self._after(newest.seq, task_id))]
                )
                if ack.error is not None:
                    continue
                newest = Stored(newest.subject, ack.seq, newest.data, {})
                found = [newest]
            record = _decode(newest.data)
            cancelled = msgspec.structs.replace(record, status=TaskStatus.CANCELLED.value)
            subject = newest.subject.replace(f"{self.stream}.{kind}.", f"{self.stream}.t.", 1)
            headers = {
                **self._after(newest.seq, task_id),
                "Nats-TTL": str(int(self.retention_seconds)),
            }
            [ack] = await link.publish_many([Outgoing(subject, _encode(cancelled), headers)])
            if ack.conflict:
                continue
            if ack.error is not None:
                raise JetStreamError("cancel", ack.error)
            await self._delete(link, [m.seq for m in found if m.subject.split(".")[1] in "rsu"])
            return True
        return False

    async def _delete(self, link: Link, seqs: Sequence[int]) -> None:
        answers = await asyncio.gather(
            *(link.api(f"STREAM.MSG.DELETE.{self.stream}", {"seq": s, "no_erase": True},
                       check=False) for s in seqs)
        )  # fmt: skip
        for answer in answers:
            error = answer.get("error")
            if error and error.get("err_code") != NO_MESSAGE_FOUND:
                log.warning("could not delete a superseded message: %s", error)

    async def _get(self, task_id: str) -> StoredRow | None:
        link = await self._link()
        newest = await link.get_last(self.stream, self._everything(task_id))
        return None if newest is None else self._stored_row(newest)

    def _stored_row(self, message: Stored) -> StoredRow:
        _, kind, queue, priority, _ = message.subject.split(".")
        record = _decode(message.data)
        lease = None
        if kind == "t" and record.status == RUNNING:
            lease = str(_Lease(message.seq, record.work, record.delivered, queue, int(priority),
                               record.reply))  # fmt: skip
        status = TaskStatus(record.status) if kind in "tf" else TaskStatus.PENDING
        return StoredRow(
            record.id, record.payload, status, record.attempts, record.due_at, lease, record.error
        )

    async def _fence(self) -> None:
        """Wait for the writes this instance started on this loop.

        A worker records a failure (a retry, say) in the background, then, in
        burst mode, asks whether anything is left: the answer must include it,
        as it would on an embedded backend.
        """
        loop = asyncio.get_running_loop()
        pending = [f for f in self._writing if f.get_loop() is loop]
        if pending:
            await asyncio.wait(pending)

    async def _count(self, queue: str) -> int:
        """Scheduled + released + ready-and-not-delivered tasks of ``queue``.

        Counted from the stream (exact at the moment of each read), minus the
        work messages the band consumers have out (running, or waiting for
        redelivery after a lost lease, as a table-based queue counts them) and
        not waiting unclaimed in this instance's pull buffers.
        Scheduled tasks are read first: one firing between the reads is then
        counted twice rather than not at all.
        """
        await self._fence()
        link = await self._link()
        name = token(queue)
        scheduled = await link.count(self.stream, f"{self.stream}.s.{name}.*.*")
        ready, released = await asyncio.gather(
            link.count(self.stream, f"{self.stream}.r.{name}.*.*"),
            link.count(self.stream, f"{self.stream}.u.{name}.*.*"),
        )
        out = 0
        if ready:
            infos = await self._list_consumers(link)
            bands = link.ext.by_queue.get(name, ())
            names = {b.name for b in bands}
            out = sum(int(i.get("num_ack_pending", 0)) for i in infos if i["name"] in names)
            out -= sum(len(b.buffer) for b in bands)  # delivered to us, not started
        return scheduled + released + max(0, ready - out)

    async def _list(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        link = await self._link()
        kinds = {TaskStatus.FAILED: "f", TaskStatus.PENDING: "rsu"}.get(status, "t")
        where = token(queue) if queue is not None else "*"
        rows: list[tuple[int, StoredRow]] = []
        for kind in kinds:
            rows += await self._scan(link, f"{self.stream}.{kind}.{where}.*.*", status, limit)
        rows.sort(key=lambda item: item[0])
        return [row for _, row in rows[:limit]]

    async def _scan(
        self, link: Link, subject: str, status: TaskStatus, limit: int
    ) -> list[tuple[int, StoredRow]]:
        """Messages on ``subject`` that are their task's newest and in ``status``, oldest first."""
        out: list[tuple[int, StoredRow]] = []
        seq = 1
        while len(out) < limit:
            page = await link.direct_get(
                self.stream, {"seq": seq, "next_by_subj": subject, "batch": _LIST_PAGE}
            )
            if not page:
                return out
            seq = page[-1].seq + 1
            subjects = [self._everything(_decode(m.data).id) for m in page]
            newest = await link.direct_get(
                self.stream, {"multi_last": subjects, "batch": 8 * len(subjects)}
            )
            latest: dict[str, int] = {}
            for m in newest:
                task = m.subject.rsplit(".", 1)[1]
                latest[task] = max(latest.get(task, 0), m.seq)
            for m in page:
                if latest.get(m.subject.rsplit(".", 1)[1]) != m.seq:
                    continue  # superseded (a dead letter being re-queued, say)
                row = self._stored_row(m)
                if row.status is status:
                    out.append((m.seq, row))
        return out[:limit]

    @_fenced
    async def _requeue(self, task_id: str, now: float) -> bool:
        link = await self._link()
        final = (TaskStatus.FAILED.value, TaskStatus.CANCELLED.value, TaskStatus.EXPIRED.value)
        for _ in range(5):
            newest = await link.get_last(self.stream, self._everything(task_id))
            if newest is None:
                return False
            _, kind, queue, priority, task = newest.subject.split(".")
            record = _decode(newest.data)
            if kind not in "tf" or record.status not in final:
                return False
            await self._ensure_bands(link, [(queue, int(priority))])
            fresh = _Record(record.id, PENDING, 0, now, record.payload)
            subject = self._subject("r", queue, int(priority), task)
            [ack] = await link.publish_many(
                [Outgoing(subject, _encode(fresh), self._after(newest.seq, task_id))]
            )
            if ack.conflict:
                continue
            if ack.error is not None:
                raise JetStreamError("requeue", ack.error)
            if kind == "f":
                await self._delete(link, [newest.seq])
            return True
        return False

    async def _close(self) -> None:
        await self._connector.close()
        if self._blocking is not None:
            self._blocking.close()
        self._held.clear()
