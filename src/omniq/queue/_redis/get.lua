-- get: one task as stored, in one read.
-- ARGV: K, id. Returns {payload, state, attempts, due time, lease id, error}
-- (state nil: unknown id).
local cur = redis.call('HMGET', task_key(ARGV[2]), 's', 'a', 'd', 'l', 'e')
return { redis.call('GET', K .. ':b:' .. ARGV[2]), cur[1], cur[2], cur[3], cur[4], cur[5] }
