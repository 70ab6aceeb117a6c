"""The Lua scripts that make every store operation atomic in Redis (one script runs with nothing interleaved).

All keys of one model/run share the hash tag `{model:run}`, so they live in one slot and these scripts run
unchanged on Redis Cluster. Window keys are named inside the scripts from the prefix passed in ARGV; they are
in the same slot as KEYS[1], which is what Cluster routing needs.

Errors start with a code the client maps to an exception:
    EMFOREIGN  the key under our prefix is not an expertmesh statistics header (another program's data)
    EMSHAPE    the header describes another model shape (layers, experts, top_k)
    EMSTAGE    a flush found no staged delta to apply (its SET failed or expired): the writer resends it
    EMGONE     a pushed source cannot be taken out: compaction merged or folded one of its deltas
"""

from __future__ import annotations

__all__ = ["FLUSH", "ENSURE", "MERGE", "FOLD", "FORGET"]

# Shared prelude: check the header, or create it from ARGV[1..7] when the prefix is empty.
# ARGV: 1 schema, 2 layers, 3 experts, 4 top_k, 5 keep, 6 decay, 7 now (seconds)
_ENSURE_META = r"""
local function ensure_meta(meta)
  local kind = redis.call('TYPE', meta)['ok']
  if kind == 'none' then
    redis.call('HSET', meta, 'schema', ARGV[1], 'layers', ARGV[2], 'experts', ARGV[3], 'top_k', ARGV[4],
               'keep', ARGV[5], 'decay', ARGV[6], 'created', ARGV[7], 'head', '-1')
    return nil
  end
  if kind ~= 'hash' then
    return 'EMFOREIGN ' .. meta .. ' is a Redis ' .. kind .. ', not an expertmesh statistics header'
  end
  local m = redis.call('HMGET', meta, 'schema', 'layers', 'experts', 'top_k')
  if m[1] ~= ARGV[1] then
    return 'EMFOREIGN ' .. meta .. ' has schema ' .. tostring(m[1]) .. ', expected ' .. ARGV[1]
  end
  if m[2] ~= ARGV[2] or m[3] ~= ARGV[3] or m[4] ~= ARGV[4] then
    return 'EMSHAPE ' .. meta .. ' holds layers=' .. tostring(m[2]) .. ' experts=' .. tostring(m[3]) ..
           ' top_k=' .. tostring(m[4]) .. '; this writer has layers=' .. ARGV[2] .. ' experts=' .. ARGV[3] ..
           ' top_k=' .. ARGV[4]
  end
  return nil
end
"""

# Create or check the header. KEYS: 1 meta. Returns the header as a flat list.
ENSURE = (
    _ENSURE_META
    + r"""
local bad = ensure_meta(KEYS[1])
if bad then return redis.error_reply(bad) end
return redis.call('HGETALL', KEYS[1])
"""
)

# Apply one writer's window delta exactly once.
# KEYS: 1 meta, 2 writers, 3 index, 4 window, 5 the writer's applied set, 6 stage, 7 blob
# ARGV: 1-7 header (see prelude), 8 writer, 9 seq, 10 window id, 11 field, 12 ttl seconds, 13 floor
# The encoded delta arrives beforehand in the stage key (a plain SET in the same pipeline) and is RENAMEd to
# its blob key here: Redis moves the value instead of copying megabytes through Lua strings and a hash.
# Dedup is exact per seq, not a high-water mark: Redis may refuse one delta of a pipeline (-LOADING while it
# loads its data after a restart, -OOM, -BUSY) and apply a later one, so seqs can land out of order. The
# writer's floor is its oldest unsettled seq: everything below it was applied or given up and is never
# applied again ('dup'), which also lets the applied set forget those seqs and stay small.
# The window's TTL is set once, by its first delta, and never moved later than its blobs' own TTLs: the
# listing expires no later than any blob it names.
FLUSH = (
    _ENSURE_META
    + r"""
local bad = ensure_meta(KEYS[1])
if bad then
  redis.call('DEL', KEYS[6])
  return redis.error_reply(bad)
end
local floor = tonumber(ARGV[13])
local settled = tonumber(redis.call('HGET', KEYS[2], ARGV[8]) or '0')
if floor > settled then
  redis.call('HSET', KEYS[2], ARGV[8], ARGV[13])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[13])
  settled = floor
end
if tonumber(ARGV[9]) < settled or redis.call('ZSCORE', KEYS[5], ARGV[9]) then
  redis.call('DEL', KEYS[6])
  return 'dup'
end
local size = redis.call('STRLEN', KEYS[6])
if size == 0 then
  return redis.error_reply('EMSTAGE ' .. KEYS[6] .. ' is missing (its SET was refused or expired); resend')
end
redis.call('RENAME', KEYS[6], KEYS[7])
redis.call('EXPIRE', KEYS[7], ARGV[12])
redis.call('HSET', KEYS[4], ARGV[11], size)
if redis.call('TTL', KEYS[4]) < 0 then redis.call('EXPIRE', KEYS[4], ARGV[12]) end
redis.call('ZADD', KEYS[5], ARGV[9], ARGV[9])
redis.call('EXPIRE', KEYS[5], ARGV[12])
redis.call('ZADD', KEYS[3], ARGV[10], ARGV[10])
local head = tonumber(redis.call('HGET', KEYS[1], 'head') or '-1')
if tonumber(ARGV[10]) > head then redis.call('HSET', KEYS[1], 'head', ARGV[10]) end
return 'ok'
"""
)

# Replace some fields of one window by their sum, if none of them was consumed meanwhile.
# KEYS: 1 window, 2 stage (the sum, SET just before). ARGV: 1 blob key prefix of this window, 2 new field,
# 3.. the fields it replaces. The sum's blob inherits the window's remaining TTL. Returns 1, or 0 on conflict.
MERGE = r"""
for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    redis.call('DEL', KEYS[2])
    return 0
  end
end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
for i = 3, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('DEL', ARGV[1] .. ARGV[i])
end
local blob = ARGV[1] .. ARGV[2]
local size = redis.call('STRLEN', KEYS[2])
redis.call('RENAME', KEYS[2], blob)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', blob, ttl) else redis.call('PERSIST', blob) end
redis.call('HSET', KEYS[1], ARGV[2], size)
return 1
"""

# Fold windows that left the retention into the decayed aggregate, if nothing changed since it was read.
# KEYS: 1 agg, 2 index. ARGV: 1 expected aggregate version ('' when none), 2 new aggregate blob,
# 3 new reference window, 4 windows folded in total, 5 window key prefix, 6 blob key prefix,
# then per window: id, nfields, fields.
# Fields that arrive after the read (late deltas) stay and are folded next time. Returns 1, or 0 on conflict.
FOLD = r"""
local ver = redis.call('HGET', KEYS[1], 'ver') or ''
if ver ~= ARGV[1] then return 0 end
local i = 7
while i <= #ARGV do
  local key = ARGV[5] .. ARGV[i]
  local nf = tonumber(ARGV[i + 1])
  for j = 1, nf do
    if redis.call('HEXISTS', key, ARGV[i + 1 + j]) == 0 then return 0 end
  end
  i = i + 2 + nf
end
i = 7
while i <= #ARGV do
  local key = ARGV[5] .. ARGV[i]
  local nf = tonumber(ARGV[i + 1])
  for j = 1, nf do
    redis.call('HDEL', key, ARGV[i + 1 + j])
    redis.call('DEL', ARGV[6] .. ARGV[i] .. ':' .. ARGV[i + 1 + j])
  end
  if redis.call('EXISTS', key) == 0 then redis.call('ZREM', KEYS[2], ARGV[i]) end
  i = i + 2 + nf
end
local nextver = tostring((tonumber(ver) or 0) + 1)
redis.call('HSET', KEYS[1], 'blob', ARGV[2], 'ref', ARGV[3], 'folded', ARGV[4], 'ver', nextver)
return 1
"""

# Take the deltas of some writers out of their windows, all or none: a pushed source replaced by a new push.
# KEYS: 1 index, 2 writers, 3 sources. ARGV: 1 window key prefix, 2 blob key prefix, 3 applied key prefix,
# 4 source id, 5 number of writers W, 6..5+W the writers, then per delta: window id, field, 1 if it must be
# there (known written) else 0. A window left empty leaves the index. Returns the number of deltas removed,
# or EMGONE naming a window whose delta compaction merged or folded away (or that expired): nothing removed.
FORGET = r"""
local first = 6 + tonumber(ARGV[5])
for i = first, #ARGV, 3 do
  if ARGV[i + 2] == '1' and redis.call('HEXISTS', ARGV[1] .. ARGV[i], ARGV[i + 1]) == 0 then
    return redis.error_reply('EMGONE window ' .. ARGV[i] .. ' no longer holds its delta ' ..
                             '(merged or folded by compaction, or expired)')
  end
end
local removed = 0
for i = first, #ARGV, 3 do
  local window = ARGV[1] .. ARGV[i]
  removed = removed + redis.call('HDEL', window, ARGV[i + 1])
  redis.call('DEL', ARGV[2] .. ARGV[i] .. ':' .. ARGV[i + 1])
  if redis.call('EXISTS', window) == 0 then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
for i = 6, first - 1 do
  redis.call('DEL', ARGV[3] .. ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
redis.call('HDEL', KEYS[3], ARGV[4])
return removed
"""
