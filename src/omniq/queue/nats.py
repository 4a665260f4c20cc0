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
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import msgspec

from .._errors import ConfigurationError
from .._nats import (
    NO_MESSAGE_FOUND,
    Connector,
    Delivery,
    JetStreamError,
    Link,
    Outgoing,
    PubAck,
    Stored,
    nats_settings,
    parse_url,
    rfc3339,
    stream_name,
    token,
)
from .._nats_blocking import BlockingPublisher, can_log_in
from .._task import TaskStatus
from ._nats_bands import Bands, ack_consumer, ack_info
from .base import LeaseRef, NewRow, StoredRow, TaskQueue

if TYPE_CHECKING:
    import ssl

    from ..results.nats import NATSResultStorage

log = logging.getLogger("omniq.queue.nats")

RUNNING, PENDING = TaskStatus.RUNNING.value, TaskStatus.PENDING.value
_NS = 1_000_000_000
#: Longest pull request held open by the server while waiting for work.
_MAX_WAIT_PULL = 30.0
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
        self._bands = Bands(self.stream, self.lease_seconds)
        self._connector = Connector(self.settings, self._setup, self._bands.release_buffers)
        self._blocking = BlockingPublisher(self.settings) if can_log_in(self.settings) else None
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
        await self._bands.setup(link)
        await self._ensure_stream(link)

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

    # -- primitives -------------------------------------------------------------------------
    @_fenced
    async def _put(self, rows: Sequence[NewRow]) -> list[bool]:
        link = await self._link()
        await self._bands.ensure(link, {(token(row.queue), row.priority) for row in rows})
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
        if not {(token(row.queue), row.priority) for row in rows} <= self._bands.made:
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
        bands = await self._bands.of_queues(link, queues)
        deliveries = await self._bands.take(link, bands, limit)
        return await self._lease(link, deliveries) if deliveries else []

    async def _lease(self, link: Link, deliveries: Sequence[Delivery]) -> list[StoredRow]:
        """Write the running record of each delivery, compare-and-set on the work message."""
        pending: list[tuple[_Record, Outgoing]] = []
        for msg in deliveries:
            delivered, seq, _ = ack_info(msg.reply)
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
        await self._bands.wait_pulls(link, queues, expires)
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
        replies: list[Outgoing] = []
        for out, (lease, _) in zip(outgoing, held, strict=True):
            ok = bool(out.subject) and next(acks).error is None
            done.append(ok)
            if ok and lease is not None:
                replies.append(Outgoing(lease.reply, verb))
                if status is TaskStatus.FAILED:
                    cleanup.append(lease.record)  # the running record, now superseded
        await self._ack_all(link, replies)
        if cleanup:
            await self._delete(link, cleanup)
        return done

    @staticmethod
    async def _ack_all(link: Link, acks: Sequence[Outgoing]) -> None:
        """Send acknowledgements, and wait until the server has processed them.

        A band consumer takes the acknowledgements of one connection in order,
        so only the last one of each band asks for an answer: after it, the
        work messages are gone and ``size()`` no longer counts them (a burst
        worker would otherwise wait for tasks that are done). An answer for
        every one would cost a drain about a tenth of its rate.
        """
        last = {ack_consumer(ack.subject): i for i, ack in enumerate(acks)}
        confirmed = set(last.values())
        rest = [ack for i, ack in enumerate(acks) if i not in confirmed]
        await link.send([(ack.subject, "", ack.payload, None) for ack in rest])
        await link.request_many([acks[i] for i in sorted(confirmed)])

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
        given = [reply for reply, ack in zip(replies, acks, strict=True) if ack.error is None]
        await self._bands.nak(link, given)

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
        out = await self._bands.out(link, name) if ready else 0
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
            await self._bands.ensure(link, [(queue, int(priority))])
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
