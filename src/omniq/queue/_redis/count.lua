-- count: pending tasks of one queue, ready or scheduled.
-- ARGV: K, queue
local ready = redis.call('ZCARD', K .. ':q:' .. ARGV[2])
return ready + (tonumber(redis.call('HGET', K .. ':scount', ARGV[2])) or 0)
