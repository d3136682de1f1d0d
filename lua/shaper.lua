--- shaper's Lua library: `local shaper = require("shaper")`.
---
--- Units, time windows, address and port sets, and process matching for policies.
--- The types of `conn`, `conn.process` and `ctx` are described in meta.lua next to this file;
--- point lua-language-server at this folder (`workspace.library`) for completion.
local name, native = ...

---@class shaper
local shaper = {}

-- Units -------------------------------------------------------------------------------------
-- Rates are bits per second, sizes are bytes: `2 * shaper.mbit`, `40 * shaper.GB`.

shaper.bit = 1
shaper.kbit = 1e3
shaper.mbit = 1e6
shaper.gbit = 1e9
shaper.B = 1
shaper.KB = 1e3
shaper.MB = 1e6
shaper.GB = 1e9
shaper.TB = 1e12
shaper.KiB = 1024
shaper.MiB = 1024 ^ 2
shaper.GiB = 1024 ^ 3
shaper.TiB = 1024 ^ 4

--- Parses a rate with shaper's units ("2mbit", "500KB/s") into bits per second.
---@param text string
---@return number
function shaper.rate(text) return native.rate(text) end

--- Parses a size with shaper's units ("20GB", "512MiB") into bytes.
---@param text string
---@return number
function shaper.size(text) return native.size(text) end

--- Raises an event: logged (with a stable MESSAGE_ID in the journal), shown by `shaper status`,
--- counted in metrics (shaper_events_total{name}) and passed to `notify_command`. The same name
--- and message pass at most once per `period` ("hour", "day" (default), "week" or "month"), so
--- calling it every cycle while a condition holds is fine.
---@param name string      # letters, digits, '_', '-', '.': names the event in metrics and hooks
---@param message string
---@param period "hour"|"day"|"week"|"month"|nil
function shaper.notify(name, message, period) return native.notify(name, message, period) end

-- Time windows ------------------------------------------------------------------------------

local day_names = { sun = 1, mon = 2, tue = 3, wed = 4, thu = 5, fri = 6, sat = 7 }

local function parse_days(text)
  local days = {}
  text = text:lower()
  if text == "weekdays" then text = "mon-fri" elseif text == "weekends" then text = "sat,sun" end
  for part in text:gmatch("[^,]+") do
    local a, b = part:match("^(%a%a%a)%-(%a%a%a)$")
    if a then
      local from, to = day_names[a], day_names[b]
      if not from or not to then return nil, "unknown day in " .. part end
      local d = from
      while true do
        days[d] = true
        if d == to then break end
        d = d % 7 + 1
      end
    elseif day_names[part] then
      days[day_names[part]] = true
    else
      return nil, "unknown day " .. part
    end
  end
  return days
end

local function parse_clock(text)
  local h, m = text:match("^(%d%d?):(%d%d)$")
  h, m = tonumber(h), tonumber(m)
  if not h or h > 24 or m > 59 or (h == 24 and m > 0) then return nil end
  return h * 60 + m
end

---@class shaper.Window
---@field days table<integer, boolean>|nil  -- wday numbers (1 = Sunday); nil = every day
---@field from integer|nil  -- minutes since midnight
---@field to integer|nil
local Window = {}
Window.__index = Window

--- A time window: "08:00-18:00", "Mon-Fri 08:00-18:00", "Sat,Sun", "weekdays 22:00-06:00".
--- A window whose end is before its start runs past midnight; its days are the days it starts on.
---@param spec string
---@return shaper.Window
function shaper.window(spec)
  if type(spec) ~= "string" then error("shaper.window takes a string such as \"Mon-Fri 08:00-18:00\"", 2) end
  local w = setmetatable({ spec = spec }, Window)
  for word in spec:gmatch("%S+") do
    local a, b = word:match("^(%d%d?:%d%d)%-(%d%d?:%d%d)$")
    if a then
      w.from, w.to = parse_clock(a), parse_clock(b)
      if not w.from or not w.to then error(("bad time range %q in window %q (use HH:MM-HH:MM)"):format(word, spec), 2) end
    else
      local days, err = parse_days(word)
      if not days then error(("%s in window %q (use e.g. Mon-Fri, Sat,Sun, weekdays)"):format(err, spec), 2) end
      w.days = days
    end
  end
  return w
end

--- Whether `time` (ctx.time, or an os.date("*t") table) is inside the window.
---@param time table
---@return boolean
function Window:contains(time)
  local minute = time.hour * 60 + time.min
  local days = self.days
  if not self.from then return days == nil or days[time.wday] == true end
  if self.from <= self.to then
    return minute >= self.from and minute < self.to and (days == nil or days[time.wday] == true)
  end
  -- Past midnight: the late part belongs to today, the early part to the day before.
  if minute >= self.from then return days == nil or days[time.wday] == true end
  if minute < self.to then return days == nil or days[(time.wday + 5) % 7 + 1] == true end
  return false
end

local windows = {}

--- Shorthand for shaper.window(spec):contains(time), with the parsed window cached.
---@param time table
---@param spec string
---@return boolean
function shaper.within(time, spec)
  local w = windows[spec]
  if not w then
    w = shaper.window(spec)
    windows[spec] = w
  end
  return w:contains(time)
end

-- Addresses and ports -----------------------------------------------------------------------

--- A set of networks: shaper.cidr("10.0.0.0/8", "fd00::/8", "192.168.1.7").
--- `set:contains(conn.remote_addr)` tests an address.
---@param ... string
---@return { contains: fun(self, addr: string): boolean }
function shaper.cidr(...) return native.cidr(...) end

---@class shaper.Ports
local Ports = {}
Ports.__index = Ports

--- A set of ports: shaper.ports(22, 443, "6881-6889").
---@param ... integer|string
---@return shaper.Ports
function shaper.ports(...)
  local set = setmetatable({ single = {}, ranges = {} }, Ports)
  for i = 1, select("#", ...) do
    local p = select(i, ...)
    if type(p) == "number" then
      set.single[p] = true
    else
      local a, b = tostring(p):match("^(%d+)%-(%d+)$")
      if not a then error(("bad port range %q (use e.g. \"6881-6889\")"):format(tostring(p)), 2) end
      set.ranges[#set.ranges + 1] = { tonumber(a), tonumber(b) }
    end
  end
  return set
end

---@param port integer
---@return boolean
function Ports:contains(port)
  if self.single[port] then return true end
  for _, r in ipairs(self.ranges) do
    if port >= r[1] and port <= r[2] then return true end
  end
  return false
end

-- Names -------------------------------------------------------------------------------------

--- Whether a host name (`conn.remote_host`, nil when none is known) is in a domain, or in any
--- of a list: "example.com" matches it and every name under it, "*.example.com" only the names
--- under it; case and a final dot do not count. A name is what this machine last looked up for
--- the address: a hint, not an identity.
---   shaper.match_domain(conn.remote_host, { "*.googlevideo.com", "youtube.com" })
---@param host string|nil
---@param domain string|string[]
---@return boolean
function shaper.match_domain(host, domain) return native.match_domain(host, domain) end

-- Processes ---------------------------------------------------------------------------------

--- A glob ("*" any text, "?" one character) as an anchored Lua pattern.
local function glob_pattern(glob)
  return "^" .. glob:gsub("[%^%$%(%)%%%.%[%]%+%-]", "%%%0"):gsub("%*", ".*"):gsub("%?", ".") .. "$"
end

--- A matcher for a list of globs: exact names by table lookup, "prefix*" by comparison, the
--- rest as patterns. Compiled once per list (lists are usually constants of the policy).
local function compile(list)
  local exact, prefixes, patterns = {}, {}, {}
  for _, glob in ipairs(list) do
    if not glob:find("[%*%?]") then
      exact[glob] = true
    elseif glob:find("^[^%*%?]*%*$") then
      prefixes[#prefixes + 1] = glob:sub(1, -2)
    else
      patterns[#patterns + 1] = glob_pattern(glob)
    end
  end
  return function(text)
    if exact[text] then return true end
    for i = 1, #prefixes do
      local p = prefixes[i]
      if text:sub(1, #p) == p then return true end
    end
    for i = 1, #patterns do
      if text:find(patterns[i]) then return true end
    end
    return false
  end
end

local list_matchers = setmetatable({}, { __mode = "k" })
local single_matchers, singles = {}, 0

--- Whether `text` matches a glob ("*" any text, "?" one character), or any glob of a list.
---@param text string|nil
---@param glob string|string[]
---@return boolean
function shaper.glob(text, glob)
  if text == nil then return false end
  local m
  if type(glob) == "table" then
    m = list_matchers[glob]
    if not m then
      m = compile(glob)
      list_matchers[glob] = m
    end
  else
    m = single_matchers[glob]
    if not m then
      if singles >= 1000 then single_matchers, singles = {}, 0 end
      m = compile({ glob })
      single_matchers[glob] = m
      singles = singles + 1
    end
  end
  return m(text)
end

local match_fields = { name = true, exe = true, user = true, unit = true, cgroup = true, cmdline = true }

--- Whether a process matches every field of `spec`; each value is a glob or a list of globs.
--- `cmdline` is matched against the arguments joined with spaces.
---   shaper.matches(conn.process, { name = { "firefox", "chrom*" }, user = "alice" })
---@param p Process|nil
---@param spec table<string, string|string[]>
---@return boolean
function shaper.matches(p, spec)
  if p == nil then return false end
  for field, glob in pairs(spec) do
    if not match_fields[field] then
      error(("shaper.matches: unknown field %q (use name, exe, user, unit, cgroup or cmdline)"):format(tostring(field)), 2)
    end
    local value = p[field]
    if field == "cmdline" then value = table.concat(value, " ") end
    if not shaper.glob(value, glob) then return false end
  end
  return true
end

--- Whether the process or one of its ancestors is named `name_or_pid` (or has that pid).
---@param p Process|nil
---@param name_or_pid string|integer
---@return boolean
function shaper.is_or_descends_from(p, name_or_pid)
  if p == nil then return false end
  if p.name == name_or_pid or p.pid == name_or_pid then return true end
  return p:descends_from(name_or_pid)
end

return shaper
