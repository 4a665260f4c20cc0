-- finish: give leased tasks a final state (ack, dead letter, expired, corrupt).
-- ARGV: K, state, has error ('1'/'0'), error,
--       tasks (msgpack [[id, lease id ('' = any)], ...])
-- Returns one 1 (done) or 0 (not running under that lease any more) per task.
local state, now = ARGV[2], clock()
local err = ARGV[3] == '1' and ARGV[4] or ''
local out, finished, indexed = {}, {}, {}
for i, ref in ipairs(cmsgpack.unpack(ARGV[5])) do
  local id = ref[1]
  local tk = task_key(id)
  local cur = redis.call('HMGET', tk, 's', 'l', 'n')
  if holds(cur, ref[2]) then
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
  call_many({ 'ZREM', K .. ':leases' }, finished)
  call_many({ 'ZADD', K .. (state == 'failed' and ':failed' or ':done') }, indexed)
end
return out
