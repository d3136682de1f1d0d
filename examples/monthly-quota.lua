-- A data plan: 100 GB a month (the plan restarts on `month_start_day` in shaper.ron).
--
-- Rather than a hard stop at the cap, the link slows down gradually as usage approaches it
-- (a sliding slowdown, as asked for in PMSS#255): full speed below 70 %, then a per-connection
-- limit that shrinks from 20 Mbit/s towards 1 Mbit/s, and 512 kbit/s once the cap is passed.
-- Interactive traffic (ssh, DNS, calls) is never slowed below 2 Mbit/s.

local shaper = require("shaper")

local CAP = 100 * shaper.GB
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

function classify(conn, ctx)
  local limit = allowance(ctx.usage("month").total)
  if interactive:contains(conn.remote_port) then
    if limit and limit < 2 * shaper.mbit then limit = 2 * shaper.mbit end
    return "interactive", limit
  end
  return "default", limit
end
