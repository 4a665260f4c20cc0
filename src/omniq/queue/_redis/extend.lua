-- extend: heartbeat, move the lease end of tasks still held under their lease.
-- ARGV: K, lease seconds, tasks (msgpack [[id, lease id ('' = any)], ...])
-- Returns one 1 (extended) or 0 (lease lost) per task.
local out, held = {}, {}
local lease_end = clock() + tonumber(ARGV[2])
for i, ref in ipairs(cmsgpack.unpack(ARGV[3])) do
  local cur = redis.call('HMGET', task_key(ref[1]), 's', 'l')
  if holds(cur, ref[2]) then
    held[#held + 1] = lease_end
    held[#held + 1] = ref[1]
    out[i] = 1
  else
    out[i] = 0
  end
end
if #held > 0 then
  call_many({ 'ZADD', K .. ':leases', 'XX' }, held)
end
return out
