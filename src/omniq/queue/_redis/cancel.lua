-- cancel: a pending task (ready or scheduled) becomes cancelled and never runs.
-- ARGV: K, id. Returns 1, or 0 for any other state or an unknown id.
local id = ARGV[2]
local tk = task_key(id)
local cur = redis.call('HMGET', tk, 's', 'q', 'n')
if cur[1] == 'ready' then
  redis.call('ZREM', K .. ':q:' .. cur[2], member(cur[3], id))
elseif cur[1] == 'scheduled' then
  redis.call('ZREM', K .. ':sched', id)
  redis.call('HINCRBY', K .. ':scount', cur[2], -1)
else
  return 0
end
local now = clock()
redis.call('HSET', tk, 's', 'cancelled', 'f', now)
redis.call('ZADD', K .. ':done', now, id)
return 1
