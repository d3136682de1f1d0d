-- Time of day: bulk transfers yield to the household in the evening.
--
-- From 18:00 to 23:00 on every day, torrents, game downloads and OS updates are held to
-- 2 Mbit/s down and 512 kbit/s up together, so video calls and streaming stay smooth. Outside
-- that window they may use the whole link, still at the lowest priority.

local shaper = require("shaper")

local evening = shaper.window("18:00-23:00")
local bulk_programs = { "transmission*", "qbittorrent*", "steam", "http", "apt*", "dnf", "packagekitd" }

function classes(ctx)
  local bulk = { prio = 7, description = "downloads that can wait" }
  if evening:contains(ctx.time) then
    bulk.ceil = { up = "512kbit", down = "2mbit" }
  end
  return {
    interactive = { prio = 1 },
    default = { prio = 4 },
    bulk = bulk,
  }
end

function classify(conn, ctx)
  if conn.remote_port == 22 or conn.remote_port == 53 then return "interactive" end
  local p = conn.process
  if p and (shaper.glob(p.name, bulk_programs) or p:descends_from("steam")) then
    return "bulk"
  end
  return "default"
end
