-- A laptop on a metered 4G plan: 30 GB a month, where every gigabyte counts.
--
-- * Calls (zoom, the usual VoIP ports) come first and are never slowed.
-- * Streaming (mpv, vlc, spotify) is capped at 3 Mbit/s down: watchable, not hungry.
-- * Updates (apt and its helpers, steam) are blocked by day (07:00-23:00) and may use
--   5 Mbit/s at night, when the line is otherwise idle.
-- * The month's usage is watched: at 80 % and 95 % a warning is raised (`shaper.notify`, passed
--   to `notify_command`, e.g. packaging's shaper-notify, which shows it on the desktop); past
--   the quota everything but calls goes down to 1 Mbit/s, streaming to 512 kbit/s, and updates
--   stay blocked day and night.
--
-- Every limit is a class ceiling set in `classes(ctx)`: it holds from a connection's first
-- packet and for the class's connections together (see "New connections" in
-- `man shaper-policy`).
--
-- Try it: shaper simulate metered-4g.lua --snapshot now.ron --at "23:30" --usage usage.ron

local shaper = require("shaper")

local QUOTA = 30 * shaper.GB
local WARN_AT = { 0.8, 0.95 }
local DAY = "07:00-23:00"

local call_ports = shaper.ports(3478, "3479-3481", "8801-8810", 5060)
local streaming = { "mpv", "vlc", "spotify" }
local updates = { "apt-get", "apt", "http", "https", "packagekitd", "unattended-upgr", "steam" }

--- Warns once a month at each threshold the month's usage has passed.
local function warn(used)
  for _, share in ipairs(WARN_AT) do
    if used >= share * QUOTA then
      shaper.notify("quota", string.format("%.0f %% of this month's %.0f GB used",
        share * 100, QUOTA / shaper.GB), "month")
    end
  end
end

function classes(ctx)
  local used = ctx.usage("month").total
  warn(used)
  local over = used >= QUOTA
  local blocked = over or shaper.within(ctx.time, DAY)
  return {
    calls = { prio = 0 },
    streaming = { prio = 3, ceil = over and "512kbit" or { down = "3mbit" } },
    -- A blocked class takes no ceiling (it drops everything).
    updates = blocked and { block = true } or { prio = 7, ceil = "5mbit" },
    default = { prio = 4, ceil = over and "1mbit" or nil },
  }
end

function classify(conn, ctx)
  local p = conn.process
  if call_ports:contains(conn.remote_port)
      or (p and shaper.is_or_descends_from(p, "zoom")) then
    return "calls"
  end
  if p and shaper.glob(p.name, streaming) then
    return "streaming"
  end
  if p and (shaper.glob(p.name, updates) or shaper.is_or_descends_from(p, "apt-get")) then
    return "updates"
  end
  return "default"
end
