-- A data plan: 100 GB a month (the plan restarts on `month_start_day` in shaper.ron).
--
-- Rather than a hard stop at the cap, the link slows down gradually as usage approaches it
-- (a sliding slowdown, as asked for in PMSS#255): full speed below 70 %, then a ceiling on the
-- `default` class that shrinks from 20 Mbit/s towards 1 Mbit/s, and 512 kbit/s once the cap is
-- passed. Interactive traffic (ssh, DNS, calls) keeps at least 2 Mbit/s.
--
-- The slowdown is a class ceiling, lowered in `classes(ctx)`, not a limit returned for each
-- connection (see "New connections" in `man shaper-policy`): a class ceiling holds from a new
-- connection's first packet and for all of the class's connections together, so opening more
-- connections does not get round it.
--
-- It warns at 80 % and 95 % of the cap, once each per month (`shaper.notify`): the warning is
-- logged (journal MESSAGE_ID 4f1a7c2e9d6b4e08a3c5b7d9e1f20a6c), shown by `shaper status`, counted
-- in the metrics and passed to `notify_command` (e.g. packaging's shaper-notify, which shows it
-- on the desktop).

local shaper = require("shaper")

local CAP = 100 * shaper.GB
local WARN_AT = { 0.8, 0.95 }
local interactive = shaper.ports(22, 53, 3478, "8801-8810")

--- The ceiling for the month's usage so far, in bit/s (nil = none).
local function allowance(used)
  local share = used / CAP
  if share < 0.7 then return nil end
  if share >= 1 then return 512 * shaper.kbit end
  -- Linear from 20 Mbit/s at 70 % to 1 Mbit/s at 100 %, in whole kbit/s.
  local t = (share - 0.7) / 0.3
  return math.floor((20 - 19 * t) * 1000 + 0.5) * shaper.kbit
end

--- Raises "quota" for each threshold passed; shaper passes each message once a month.
local function warn(used)
  for _, share in ipairs(WARN_AT) do
    if used >= share * CAP then
      shaper.notify("quota", string.format("%.0f %% of this month's %.0f GB used",
        share * 100, CAP / shaper.GB), "month")
    end
  end
end

-- Called once a cycle, before any classify.
function classes(ctx)
  local used = ctx.usage("month").total
  warn(used)
  local ceil = allowance(used)
  return {
    interactive = { prio = 1, ceil = ceil and math.max(ceil, 2 * shaper.mbit) },
    default = { prio = 4, ceil = ceil },
  }
end

function classify(conn, ctx)
  if interactive:contains(conn.remote_port) then
    return "interactive"
  end
  return "default"
end
