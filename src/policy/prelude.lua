-- shaper's VM prelude: runs once in every policy VM, before the user's script.
-- It receives `raw`, the Rust primitives, and returns the per-cycle `ctx` builder.
-- It finishes the sandbox (os, string guards, print) so the rules live in one place.
local raw = ...

local error, type, tostring, select = error, type, tostring, select
local concat = table.concat

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

-- string: no bytecode, and guards against the two ways a single C call can outrun the
-- instruction budget: a huge string.rep and a backtracking pattern on a long subject.
do
  string.dump = nil
  local rep, find, match, gmatch, gsub = string.rep, string.find, string.match, string.gmatch, string.gsub
  local limit = raw.memory_limit
  string.rep = function(s, n, sep)
    if type(s) == "string" and type(n) == "number" and n > 0 then
      local total = #s * n + (type(sep) == "string" and #sep * (n - 1) or 0)
      if total > limit then
        error(("string.rep would build %.0f bytes, over the policy's memory limit of %d"):format(total, limit), 2)
      end
    end
    return rep(s, n, sep)
  end
  -- Longest subject each pattern may be matched against (computed once per distinct pattern).
  local max_subject, cached = {}, 0
  local function check(s, p, plain)
    if plain or type(s) ~= "string" or type(p) ~= "string" then return end
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

  function ctx.usage(period, key)
    key = key or "link"
    local per = usage_cache[period]
    if per == nil then
      per = {}
      usage_cache[period] = per
    end
    local u = per[key]
    if u == nil then
      local ok, up, down = pcall(raw.usage, period, key)
      if not ok then error(up, 2) end
      u = { up = up, down = down, total = up + down }
      per[key] = u
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
