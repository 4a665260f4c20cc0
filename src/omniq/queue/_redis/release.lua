-- release: leased tasks that never started go back, ready, their attempt taken back.
-- ARGV: K, tasks (msgpack [[id, lease id ('' = any)], ...])
local woken = {}
for _, ref in ipairs(cmsgpack.unpack(ARGV[2])) do
  local id = ref[1]
  local tk = task_key(id)
  local cur = redis.call('HMGET', tk, 's', 'l', 'q', 'p', 'n')
  if holds(cur, ref[2]) then
    redis.call('ZREM', K .. ':leases', id)
    redis.call('HINCRBY', tk, 'a', -1)
    redis.call('HDEL', tk, 'l')
    make_ready(tk, id, cur[3], cur[4], cur[5])
    woken[cur[3]] = (woken[cur[3]] or 0) + 1
  end
end
for queue, n in pairs(woken) do
  wake(queue, n)
end
return 0
