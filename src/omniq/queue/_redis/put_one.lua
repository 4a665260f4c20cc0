-- put_one: put for a single task (omniq.enqueue), with flat arguments instead of a
-- batch to unpack, and the helpers task_key, member and wake written out: their
-- closures alone cost as much as a redis.call on every run. About half the
-- server time of put for the same transition.
-- ARGV: K, id, queue, priority, -priority (its score), due time,
--       ready ('1': due by the producer's clock, as in put), payload
-- Returns 1 (inserted) or 0 (known id). Wakes the task's queue.
local id, queue = ARGV[2], ARGV[3]
-- The payload key exists exactly as long as the task: it is the idempotency guard.
if not redis.call('SET', K .. ':b:' .. id, ARGV[8], 'NX') then
  return 0
end
local n = redis.call('INCR', K .. ':seq')
local tk = K .. ':t:' .. id
if ARGV[7] == '1' then
  redis.call('HSET', tk, 'q', queue, 'p', ARGV[4], 'n', n, 'd', ARGV[6], 's', 'ready')
  redis.call('ZADD', K .. ':q:' .. queue, ARGV[5], string.format('%016x', n) .. id)
else
  redis.call('HSET', tk, 'q', queue, 'p', ARGV[4], 'n', n, 'd', ARGV[6], 's', 'scheduled')
  redis.call('ZADD', K .. ':sched', ARGV[6], id)
  redis.call('HINCRBY', K .. ':scount', queue, 1)
end
-- A scheduled task wakes too: idle consumers then re-arm their timers for its due time.
local wakeup = K .. ':w:' .. queue
if redis.call('LLEN', wakeup) < WAKE_CAP then
  redis.call('RPUSH', wakeup, '1')
end
return 1
