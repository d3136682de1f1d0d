-- A data plan: 100 GB a month (the plan restarts on `month_start_day` in shaper.ron).
--
-- Rather than a hard stop at the cap, the link slows down gradually as usage approaches it
-- (a sliding slowdown, as asked for in PMSS#255): full speed below 70 %, then a per-connection
-- limit that shrinks from 20 Mbit/s towards 1 Mbit/s, and 512 kbit/s once the cap is passed.
-- Interactive traffic (ssh, DNS, calls) is never slowed below 2 Mbit/s.
--
-- It warns at 80 % and 95 % of the cap, once each per month (`shaper.notify`): the warning is
-- logged (journal MESSAGE_ID 4f1a7c2e9d6b4e08a3c5b7d9e1f20a6c), shown by `shaper status`, counted
-- in the metrics and passed to `notify_command` (e.g. a script calling notify-send or mail).

local shaper = require("shaper")

local CAP = 100 * shaper.GB
local WARN_AT = { 0.8, 0.95 }
local interactive = shaper.ports(22, 53, 3478, "8801-8810")

classes = {
  interactive = { prio = 1 },
  default = { prio = 4 },
}

--- The per-connection limit for the month's usage so far, in bit/s (nil = no limit).
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

function classify(conn, ctx)
  local used = ctx.usage("month").total
  warn(used)
  local limit = allowance(used)
  if interactive:contains(conn.remote_port) then
    if limit and limit < 2 * shaper.mbit then limit = 2 * shaper.mbit end
    return "interactive", limit
  end
  return "default", limit
end
