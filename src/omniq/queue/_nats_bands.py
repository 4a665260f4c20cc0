"""The band consumers of a NATS queue stream: making them, listing them, pulling from them.

Each queue and priority is a band: a durable pull consumer ``r~<q>~<p>`` whose
filter is ``<S>.r.<q>.<p>.*`` and whose AckWait is the lease (see
``omniq.queue.nats`` for the whole layout). ``Bands`` is what one queue instance
knows of them on one connection (``Link.ext`` holds a ``_State``): which exist
(refreshed by the server's consumer advisories), the pull requests it has out,
and the deliveries it pulled but has not leased yet. ``take`` is the claim's
half that is about JetStream's delivery order: bands in queue order, highest
priority first, fetching as little as possible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from .._nats import CONSUMER_EXISTS, Delivery, JetStreamError, Link, Outgoing, status_of, token

if TYPE_CHECKING:
    from nats.aio.msg import Msg

log = logging.getLogger("omniq.queue.nats")

_NS = 1_000_000_000
#: A delivery that waited unclaimed in a pull buffer longer than this share of
#: AckWait is given back (NAK) rather than started on a shortened lease.
_FRESH_SHARE = 0.25
#: How long a claim's pull waits for a message the consumer has not counted yet.
_CLAIM_GRACE = 0.005
#: How often the list of bands is re-read even without an advisory.
_BANDS_MAX_AGE = 30.0
#: A wait pull outlives the wait that armed it by this much, and the next wait
#: arms a fresh one when the current one ends within ``_RENEW_BEFORE``: a band
#: is never without a pull between one wait and the next (a message stored
#: while no pull is out is delivered only when the next one comes).
_WAIT_OVERLAP = 1.0
_RENEW_BEFORE = 2.0


def ack_info(reply: str) -> tuple[int, int, int]:
    """(delivery count, stream sequence, pending after it) from a JetStream ack subject."""
    parts = reply.split(".")
    if len(parts) == 9:  # $JS.ACK.<stream>.<consumer>.<dc>.<sseq>.<cseq>.<ts>.<pending>
        return int(parts[4]), int(parts[5]), int(parts[8])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<dc>.<sseq>.<cseq>.<ts>.<pending>[.<x>]
    return int(parts[6]), int(parts[7]), int(parts[10])


def ack_consumer(reply: str) -> str:
    """The stream and consumer named by a JetStream ack subject (formats as in ``ack_info``)."""
    parts = reply.split(".")
    return ".".join(parts[2:4] if len(parts) == 9 else parts[2:6])


def _window(bands: Sequence[Band], start: int, need: int) -> list[Band]:
    """Bands from ``start`` until, by what they last said they hold, ``need`` is covered."""
    window: list[Band] = []
    expected = 0
    for band in bands[start:]:
        if window and expected >= need:
            break
        window.append(band)
        expected += len(band.buffer) + band.hint
    return window


def _pop(band: Band, taken: list[Delivery], limit: int) -> None:
    while len(taken) < limit and band.buffer:
        taken.append(band.buffer.popleft()[0])


def _idle(band: Band) -> bool:
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
class Band:
    """One band consumer as one connection sees it, with deliveries not claimed yet."""

    index: int
    name: str
    queue: str
    priority: int
    ack_wait: float
    buffer: deque[tuple[Delivery, float]] = field(default_factory=deque)
    #: Messages the server said were left after our last delivery (0: maybe empty).
    hint: int = 0
    pulls: dict[int, _Pull] = field(default_factory=dict)
    #: Our newest wait pull (the server holds it until work comes) and when it ends.
    wait_pull: int | None = None
    wait_ends: float = 0.0


class _State:
    """What one connection knows: the bands, and the numbers it has used."""

    def __init__(self) -> None:
        self.bands: dict[str, Band] = {}
        self.by_index: dict[int, Band] = {}
        self.by_queue: dict[str, list[Band]] = {}
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
            band = Band(next(self.numbers), name, queue, priority, ack_wait)
            await link.listen(f"p.{band.index}", lambda msg: on_delivery(link, band, msg))
            self.bands[name] = band
            self.by_index[band.index] = band
            ranked = self.by_queue.setdefault(queue, [])
            ranked.append(band)
            ranked.sort(key=lambda b: -b.priority)


class Bands:
    """The band consumers of ``stream`` as one queue instance uses them, per connection."""

    def __init__(self, stream: str, lease_seconds: float) -> None:
        self.stream = stream
        self.lease_seconds = lease_seconds
        #: Bands whose consumer exists (made or seen by ``ensure``) as (queue token,
        #: priority): the sync facade's enqueue publishes to those without a loop.
        self.made: set[tuple[str, int]] = set()

    async def setup(self, link: Link) -> None:
        """A new connection's state, kept fresh by the consumer advisories."""
        state = _State()
        link.ext = state
        link.on_reconnect.append(lambda: self._forget_pulls(state))
        for event in ("CREATED", "DELETED"):
            await link.nc.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.{event}.{self.stream}.*", cb=self._advisory(link)
            )

    async def out(self, link: Link, queue: str) -> int:
        """Work messages of ``queue`` the band consumers have out (running, or waiting
        for redelivery after a lost lease), less those waiting in our pull buffers."""
        infos = await self._list_consumers(link)
        bands = link.ext.by_queue.get(queue, ())
        names = {b.name for b in bands}
        out = sum(int(i.get("num_ack_pending", 0)) for i in infos if i["name"] in names)
        return out - sum(len(b.buffer) for b in bands)  # delivered to us, not started

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
            band.wait_pull, band.wait_ends = None, 0.0
        self._invalidate(state)

    # -- consumers --------------------------------------------------------------------------
    def _config(self, name: str, queue: str, priority: int) -> dict[str, Any]:
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

    async def ensure(self, link: Link, bands: Iterable[tuple[str, int]]) -> None:
        """Producers create a band's consumer before its first task, so waiters see it."""
        state: _State = link.ext
        bands = set(bands)
        missing = sorted({(q, p) for q, p in bands if f"r~{q}~{p}" not in state.bands})
        infos = await asyncio.gather(
            *(self._create_consumer(link, f"r~{q}~{p}", self._config(f"r~{q}~{p}", q, p))
              for q, p in missing)
        )  # fmt: skip
        for (q, p), info in zip(missing, infos, strict=True):
            await self._add(link, f"r~{q}~{p}", q, p, info["config"]["ack_wait"] / _NS)
        self.made.update(bands)

    async def _add(self, link: Link, name: str, queue: str, priority: int, ack_wait: float) -> None:
        await link.ext.add(link, name, queue, priority, ack_wait, self._delivered)

    async def of_queues(self, link: Link, queues: Sequence[str]) -> list[Band]:
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
                await self._add(link, info["name"], queue, int(priority), ack_wait)
        if state.invalidations == generation:  # no advisory came while listing
            state.valid_until = valid_until
        return infos

    async def _check_lease(self, link: Link, band: Band) -> None:
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
        config = self._config(band.name, band.queue, band.priority)
        await self._create_consumer(link, band.name, config, action="update")
        band.ack_wait = self.lease_seconds

    # -- pulls ------------------------------------------------------------------------------
    def _delivered(self, link: Link, band: Band, msg: Delivery) -> None:
        """A pull's delivery (buffered until claimed) or status (the pull is over)."""
        status = status_of(msg)
        if status is None:
            band.buffer.append((msg, time.monotonic()))
            band.hint = ack_info(msg.reply)[2]
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
        number = int(msg.subject.rsplit(".", 1)[1])
        if status in ("404", "408"):
            band.hint = 0
        elif status == "409":  # consumer deleted, leadership change, …: list again
            self._invalidate(link.ext)
            link.ring()
        if number == band.wait_pull:
            # The band is left without a wait pull: a waiting claim must arm
            # another, or a task stored meanwhile would wait for its next round.
            link.ring()
        self._end_pull(band, number)

    def _end_pull(self, band: Band, number: int) -> None:
        pull = band.pulls.pop(number, None)
        if pull is not None:
            pull.end()
        if number == band.wait_pull:
            band.wait_pull, band.wait_ends = None, 0.0

    async def _pull(self, link: Link, band: Band, batch: int, expires: float | None) -> int:
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

    async def _fetch(self, link: Link, band: Band, batch: int) -> None:
        """Pull up to ``batch`` available messages into the band's buffer (no waiting)."""
        await self._check_lease(link, band)
        number = await self._pull(link, band, batch, None)
        pull = band.pulls[number]
        done, _ = await asyncio.wait({pull.future}, timeout=5.0)
        if not done:
            log.debug("pull from %s got no answer", band.name)
            self._end_pull(band, number)

    async def wait_pulls(self, link: Link, queues: Sequence[str], expires: float) -> None:
        """A pull request held by the server on each band of ``queues`` for the next
        ``expires`` seconds: the next task of any band comes to us by itself."""
        now = time.monotonic()
        for band in await self.of_queues(link, queues):
            if band.buffer:
                continue
            if band.wait_pull is None or band.wait_ends - now < min(expires, _RENEW_BEFORE):
                await self._check_lease(link, band)
                await self._arm(link, band, expires + _WAIT_OVERLAP)

    async def _arm(self, link: Link, band: Band, expires: float) -> None:
        band.wait_pull = await self._pull(link, band, 1, expires)
        band.wait_ends = time.monotonic() + expires

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

    async def take(self, link: Link, bands: Sequence[Band], limit: int) -> list[Delivery]:
        """Up to ``limit`` deliveries, in band order, fetching as little as possible.

        Bands are pulled concurrently, starting at the first one not known to
        be able to fill the claim by itself; what lower bands returned beyond
        the claim goes back to the server at once (NAK keeps its place).
        """
        taken: list[Delivery] = []
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
            await self.nak(link, giveback)
        return taken

    async def nak(self, link: Link, replies: Sequence[str]) -> None:
        """Give deliveries back at their place, and wait until the server has them."""
        await link.request_many([Outgoing(reply, b"-NAK") for reply in replies])

    async def release_buffers(self, link: Link) -> None:
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
