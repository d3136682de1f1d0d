-- shaper's VM prelude: runs once in every policy VM, before the user's script.
-- It receives `raw`, the Rust primitives, and returns the per-cycle `ctx` builder.
-- It finishes the sandbox (os, string guards, print) so the rules live in one place.
local raw = ...

local error, type, tostring, tonumber, select = error, type, tostring, tonumber, select
local concat = table.concat
-- Raises the pending stop (an exhausted budget, a cancelled VM) if there is one.
local checkpoint = raw.checkpoint

-- Protected calls cannot swallow a stop: what the budget hook or the engine's cancellation raised
-- is raised again, so `while true do pcall(spin) end` ends like `spin()` does.
do
  local pcall, xpcall, resume, close = pcall, xpcall, coroutine.resume, coroutine.close
  local function pass(ok, ...)
    if not ok then checkpoint() end
    return ok, ...
  end
  _G.pcall = function(f, ...) return pass(pcall(f, ...)) end
  _G.xpcall = function(f, handler, ...) return pass(xpcall(f, handler, ...)) end
  coroutine.resume = function(co, ...) return pass(resume(co, ...)) end
  coroutine.close = function(co) return pass(close(co)) end
end

-- os: read-only time functions only. os.time() and os.date() without a time argument follow the
-- cycle's clock, so `shaper simulate --at` means the same thing to a script as real time does.
do
  local real_time, real_date, real_clock = os.time, os.date, os.clock
  local api = {
    time = function(t)
      if t == nil then return raw.now() end
      return real_time(t)
    end,
    date = function(fmt, t)
      return real_date(fmt, t or raw.now())
    end,
    clock = real_clock,
  }
  os = setmetatable({}, {
    __index = api,
    __newindex = function() error("os is read-only in a policy", 2) end,
    __metatable = false,
  })
end

-- The length Lua's string coercion gives a string or number argument; nil for other types.
local function text_length(v)
  local t = type(v)
  if t == "string" then return #v end
  if t == "number" then return #tostring(v) end
end

-- string: no bytecode, and guards against the ways a single C call can outrun the instruction
-- budget (the hook runs only between Lua instructions): a huge string.rep, or one that repeats
-- nothing 2^62 times, and a backtracking pattern on a long subject. Each guard is also a
-- checkpoint, so a cancelled VM stops at its next guarded call.
do
  string.dump = nil
  local rep, find, match, gmatch, gsub = string.rep, string.find, string.match, string.gmatch, string.gsub
  local limit = raw.memory_limit
  string.rep = function(s, n, sep)
    checkpoint()
    local count, len = tonumber(n), text_length(s)
    if count and len and count > 0 then
      local total = len * count + (text_length(sep) or 0) * (count - 1)
      if total > limit then
        error(("string.rep would build %.0f bytes, over the policy's memory limit of %d"):format(total, limit), 2)
      end
      -- Lua copies nothing `count` times: as long as 2^62 iterations take.
      if total == 0 and count == count // 1 then return "" end
    end
    return rep(s, n, sep)
  end
  -- Longest subject each pattern may be matched against (computed once per distinct pattern).
  local max_subject, cached = {}, 0
  local function check(s, p, plain)
    checkpoint()
    if type(s) ~= "string" or type(p) ~= "string" then return end
    if plain then
      -- A plain search compares up to the whole needle at every position (memcmp speed).
      if #s * #p > 1e9 then
        error(("plain search for a %d-byte string in a %d-byte string would compare %.0f bytes "
          .. "(at most 1e9)"):format(#p, #s, #s * #p), 3)
      end
      return
    end
    local max = max_subject[p]
    if not max then
      if cached >= 1000 then max_subject, cached = {}, 0 end
      max = raw.pattern_limit(p)
      max_subject[p] = max
      cached = cached + 1
    end
    if #s > max then
      error(("pattern %q is too expensive on a %d-byte string (at most %d bytes for this pattern): "
        .. "anchor it with ^, use fewer .- / .* items, or pass plain = true"):format(p, #s, max), 3)
    end
  end
  string.find = function(s, p, init, plain) check(s, p, plain) return find(s, p, init, plain) end
  string.match = function(s, p, init) check(s, p) return match(s, p, init) end
  string.gmatch = function(s, p, init) check(s, p) return gmatch(s, p, init) end
  string.gsub = function(s, p, r, n) check(s, p) return gsub(s, p, r, n) end
end

-- table: the functions that walk a range in C (through a length `__len` can make up, or bounds
-- the caller gives) refuse more elements than a table within the memory limit can hold: with
-- metamethods written in C, or on nils, such a walk runs no Lua instruction for the hook to stop.
do
  local tconcat, move, insert, remove, sort = table.concat, table.move, table.insert, table.remove, table.sort
  local max = raw.memory_limit // 16
  local function walk(what, n)
    checkpoint()
    if n and n > max then
      error(("table.%s over %.0f elements would run too long inside C (at most %d)"):format(what, n, max), 3)
    end
  end
  local function length(t)
    if type(t) == "table" then return #t end
  end
  local function span(from, to)
    from, to = tonumber(from), tonumber(to)
    if from and to then return to - from + 1 end
  end
  table.concat = function(t, sep, i, j)
    local n = length(t)
    walk("concat", n and span(i or 1, j or n))
    return tconcat(t, sep, i, j)
  end
  table.move = function(a1, f, e, t, a2)
    walk("move", span(f, e))
    return move(a1, f, e, t, a2)
  end
  table.insert = function(t, ...)
    walk("insert", length(t))
    return insert(t, ...)
  end
  table.remove = function(t, ...)
    walk("remove", length(t))
    return remove(t, ...)
  end
  table.sort = function(t, ...)
    walk("sort", length(t))
    return sort(t, ...)
  end
end

-- print goes to shaper's log, prefixed with the script's name.
print = function(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  raw.log(concat(parts, "\t"))
end

-- Process tables (conn.process) share this metatable.
local process_methods = {}

--- Whether an ancestor (not the process itself) has this name or pid.
function process_methods.descends_from(p, who)
  local ancestors = p.ancestors
  for i = 1, #ancestors do
    local a = ancestors[i]
    if a.name == who or a.pid == who then return true end
  end
  return false
end

local process_meta = {
  __index = process_methods,
  __tostring = function(p) return p.name .. " (" .. p.pid .. ")" end,
}

-- The per-cycle context. Lookups are cached for the cycle: a policy may ask for the same figure
-- for every connection.
local function make_ctx(now, time, interface, rate, connection_rate)
  local usage_cache, class_cache, file_cache = {}, {}, {}
  local ctx = {
    now = now, time = time, interface = interface,
    rate = rate, connection_rate = connection_rate,
  }

  function ctx.usage(period, key, ago)
    key = key or "link"
    local per = usage_cache[period]
    if per == nil then
      per = {}
      usage_cache[period] = per
    end
    local ck = key
    if ago ~= nil and ago ~= 0 then ck = key .. "\0" .. tostring(ago) end
    local u = per[ck]
    if u == nil then
      local ok, up, down = pcall(raw.usage, period, key, ago)
      if not ok then error(up, 2) end
      u = { up = up, down = down, total = up + down }
      per[ck] = u
    end
    return u
  end

  function ctx.class(name)
    local c = class_cache[name]
    if c == nil then
      local ok, connections, rate_up, rate_down, tokens_up, tokens_down = pcall(raw.class, name)
      if not ok then error(connections, 2) end
      c = {
        connections = connections, rate_up = rate_up, rate_down = rate_down,
        tokens_up = tokens_up, tokens_down = tokens_down,
      }
      class_cache[name] = c
    end
    return c
  end

  function ctx.rate_file(path, default)
    local ck = tostring(path) .. "\0" .. tostring(default)
    local r = file_cache[ck]
    if r == nil then
      local ok, up, down = pcall(raw.rate_file, path, default)
      if not ok then error(up, 2) end
      if up == down then r = up or false else r = { up = up, down = down } end
      file_cache[ck] = r
    end
    return r or nil
  end

  return ctx
end

return make_ctx, process_meta
