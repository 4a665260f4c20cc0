-- finish: give leased tasks a final state (ack, dead letter, expired, corrupt).
-- ARGV: K, state, has error ('1'/'0'), error,
--       tasks (msgpack [[id, lease id ('' = any)], ...])
-- Returns one 1 (done) or 0 (not running under that lease any more) per task.
-- Every task ends here once: the schema's helpers are written out (see claim).
local t = redis.call('TIME')
local state, now = ARGV[2], tonumber(t[1]) + tonumber(t[2]) / 1000000
local err = ARGV[3] == '1' and ARGV[4] or ''
local out, finished, indexed = {}, {}, {}
for i, ref in ipairs(cmsgpack.unpack(ARGV[5])) do
  local id = ref[1]
  local tk = K .. ':t:' .. id
  local cur = redis.call('HMGET', tk, 's', 'l', 'n')
  if cur[1] == 'running' and (ref[2] == '' or cur[2] == ref[2]) then -- holds(cur, ref[2])
    redis.call('HSET', tk, 's', state, 'f', now, 'l', '', 'e', err)
    finished[#finished + 1] = id
    -- The dead letter is listed in enqueue order; other final states expire in finish order.
    indexed[#indexed + 1] = state == 'failed' and cur[3] or now
    indexed[#indexed + 1] = id
    out[i] = 1
  else
    out[i] = 0
  end
end
if #finished > 0 then
  local index = K .. (state == 'failed' and ':failed' or ':done')
  for i = 1, #finished, SLICE do
    redis.call('ZREM', K .. ':leases', unpack(finished, i, math.min(i + SLICE - 1, #finished)))
    redis.call('ZADD', index, unpack(indexed, 2 * i - 1, math.min(2 * (i + SLICE - 1), #indexed)))
  end
end
return out
