-- requeue: a failed, cancelled or expired task becomes ready again, due now,
-- attempts 0, error cleared, at its original FIFO place.
-- ARGV: K, id. Returns 1, or 0 for any other state or an unknown id.
local id = ARGV[2]
local tk = task_key(id)
local cur = redis.call('HMGET', tk, 's', 'q', 'p', 'n')
if cur[1] ~= 'failed' and cur[1] ~= 'cancelled' and cur[1] ~= 'expired' then
  return 0
end
redis.call('ZREM', K .. ':failed', id)
redis.call('ZREM', K .. ':done', id)
redis.call('HSET', tk, 'a', 0, 'd', clock())
redis.call('HDEL', tk, 'e', 'f')
make_ready(tk, id, cur[2], cur[3], cur[4])
wake(cur[2], 1)
return 1
