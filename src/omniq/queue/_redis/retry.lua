-- retry: a leased task failed and runs again at `due` (attempts kept).
-- ARGV: K, id, lease id ('' = any), due time, has error ('1'/'0'), error
-- Returns 1, or 0 if the task is not running under that lease any more.
local id, due = ARGV[2], ARGV[4]
local tk = task_key(id)
local cur = redis.call('HMGET', tk, 's', 'l', 'q', 'p', 'n')
if not holds(cur, ARGV[3]) then
  return 0
end
redis.call('ZREM', K .. ':leases', id)
redis.call('HSET', tk, 'd', due)
if ARGV[5] == '1' then
  redis.call('HSET', tk, 'e', ARGV[6])
  redis.call('HDEL', tk, 'l')
else
  redis.call('HDEL', tk, 'l', 'e')
end
if tonumber(due) <= clock() then
  make_ready(tk, id, cur[3], cur[4], cur[5])
else
  redis.call('HSET', tk, 's', 'scheduled')
  redis.call('ZADD', K .. ':sched', due, id)
  redis.call('HINCRBY', K .. ':scount', cur[3], 1)
end
wake(cur[3], 1)
return 1
