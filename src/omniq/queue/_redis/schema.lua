-- OmniQ on Redis: the key schema, and helpers shared by the queue scripts.
--
-- This header is prepended to every queue script of this folder; each script is
-- run with EVALSHA (loaded once, again after NOSCRIPT), so every state change of
-- a task is atomic and takes one round trip. ARGV[1] of every script is K.
--
-- K is "{<prefix>}" (default "{omniq}"). The braces are a Redis Cluster hash tag:
-- every key of one OmniQ namespace lives in one slot, so a script may touch any.
--
--   K:t:<id>      HASH    one task for its whole life:
--                          q queue, p priority, n enqueue sequence number,
--                          d due time (Unix s), s state, a attempts, l lease id
--                          ('' or absent: none), e last error ('' or absent: none),
--                          f finish time (Unix s)
--                         s: ready | scheduled | running                 (live)
--                            succeeded | failed | cancelled | expired    (final)
--                         Short values only: the hash stays in Redis's compact
--                         encoding (values under 64 bytes), a third of the memory.
--   K:b:<id>      STRING  the task's payload (opaque bytes); exists exactly as long as
--                         K:t:<id>, so put's SET NX on it is the idempotency guard
--   K:seq         STRING  the enqueue sequence counter (FIFO tie-break)
--   K:q:<queue>   ZSET    ready tasks of one queue. Score -priority; the member is
--                         n as 16 hex digits followed by the id, so tasks of equal
--                         priority sort bytewise by member, i.e. in enqueue order
--   K:sched       ZSET    scheduled tasks (eta, retry backoff): score due time, member id
--   K:scount      HASH    queue -> how many of its tasks are in K:sched
--   K:leases      ZSET    running tasks: score lease end (Unix s), member id
--   K:w:<queue>   LIST    wake-up tokens: idle consumers of the queue BLPOP here;
--                         a change that makes work claimable pushes (at most WAKE_CAP)
--   K:wt:<consumer> LIST  a token an idle consumer moved out of K:w:<queue> (BLMOVE),
--                         taken again at once by the claim sent right behind it
--   K:failed      ZSET    the dead letter: score n, member id (kept until re-queued)
--   K:done        ZSET    succeeded, cancelled and expired tasks: score finish time;
--                         deleted with their hashes once older than the retention
--
-- Lists of tasks travel as one MessagePack argument (cmsgpack.unpack): one
-- argument per batch instead of several per task. Payloads, which are bytes
-- (MessagePack "bin", which cmsgpack cannot read), are arguments of their own.
--
-- Results (omniq.results.redis) and events (omniq.events.redis) use the same K:
--   K:r:<id>      STRING  the task's result (msgpack TaskResult), PX = its result ttl
--   K:rw:<id>     STRING  present while a client waits for that result
--   K:rl:<id>     LIST    the result once more, for those waiters to BLMOVE
--   K:events      STREAM  task events, trimmed with MAXLEN ~ / MINID ~
--
-- Times are Unix seconds. "Now" is the server's clock (TIME) for leases, expiry
-- of leases, finish times and scheduled tasks becoming ready, so a host whose
-- clock is off cannot take a task whose lease is still alive. Due times (eta,
-- retry backoff) are wall times that clients compute: keep the hosts' clocks in
-- sync (NTP) for punctual etas. A task already due by its producer's clock when
-- it is put (every task without an eta) is ready at once: put and put_one need
-- no TIME of their own.

local K = ARGV[1]

-- Helpers. The loader (load_script) keeps only those a script uses: Lua builds
-- every closure again on each run, which costs microseconds per call.

local WAKE_CAP = 32

-- The server's clock, in Unix seconds (scripts are replicated by their effects,
-- so reading it before writing is allowed).
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- A task's hash.
local function task_key(id)
  return K .. ':t:' .. id
end

-- Push up to `count` wake-up tokens for `queue`, keeping its list within WAKE_CAP.
local function wake(queue, count)
  local key = K .. ':w:' .. queue
  local room = WAKE_CAP - redis.call('LLEN', key)
  for _ = 1, math.min(count, room) do
    redis.call('RPUSH', key, '1')
  end
end

-- A task's member in its queue's ZSET: its enqueue sequence, then its id.
local function member(n, id)
  return string.format('%016x', n) .. id
end

-- A task becomes claimable: into its queue's ZSET, at its original FIFO place.
local function make_ready(tk, id, queue, priority, n)
  redis.call('HSET', tk, 's', 'ready')
  redis.call('ZADD', K .. ':q:' .. queue, -tonumber(priority), member(n, id))
end

-- Lua's unpack is bounded by its C stack: lists go to redis.call in slices.
local SLICE = 4000

-- redis.call(head..., list...); one call for a whole batch costs far less than one per task.
local function call_many(head, list)
  for i = 1, #list, SLICE do
    local args = { unpack(head) }
    for j = i, math.min(i + SLICE - 1, #list) do
      args[#args + 1] = list[j]
    end
    redis.call(unpack(args))
  end
end

-- MGET of any number of keys; false where a key is missing.
local function mget(keys)
  local values = {}
  for i = 1, #keys, SLICE do
    local part = redis.call('MGET', unpack(keys, i, math.min(i + SLICE - 1, #keys)))
    for j = 1, #part do
      values[i + j - 1] = part[j]
    end
  end
  return values
end

-- Delete a task: its hash and its payload.
local function forget(id)
  redis.call('DEL', task_key(id), K .. ':b:' .. id)
end

-- Does the task at `cur` (s, l, ...) hold the lease `lease` ('' matches any)?
local function holds(cur, lease)
  return cur[1] == 'running' and (lease == '' or cur[2] == lease)
end
