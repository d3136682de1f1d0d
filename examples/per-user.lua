-- Per-user limits on a shared machine: each user gets a fair share, services get theirs.
--
-- Every user's traffic is its own class with a 10 Mbit/s ceiling shared by that user's
-- processes; system services share one class; root is not limited. Users who used more than
-- 5 GB today drop to 2 Mbit/s for the rest of the day.

local shaper = require("shaper")

local DAILY = 5 * shaper.GB

function classes(ctx)
  return {
    default = { prio = 4 },
    services = { prio = 3, ceil = "20mbit", description = "system services" },
    users = { prio = 4, ceil = "10mbit", each = "process", description = "one share per process" },
    root = { prio = 2 },
  }
end

function classify(conn, ctx)
  local p = conn.process
  if not p then return "default" end
  if p.uid == 0 then return "root" end
  if p.uid < 1000 then return "services" end
  local today = ctx.usage("day", "user:" .. (p.user or p.uid))
  if today.total > DAILY then
    return "users", "2mbit"
  end
  return "users"
end
