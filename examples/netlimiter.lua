-- A NetLimiter-style rule set: priorities, and limits that apply per application.
--
-- NetLimiter's limits can apply to a filter as a whole, to each process in it, or to each
-- connection. In shaper that is a class's `each`: "class" (the default) shares one ceiling,
-- "process" gives every process its own, "connection" every connection its own.

local shaper = require("shaper")

classes = {
  -- Games and calls: served first, never limited.
  realtime = { prio = 0 },
  -- Every updater gets at most 4 Mbit/s down, each on its own (two updaters: 8 Mbit/s).
  updaters = { prio = 6, ceil = { down = "4mbit", up = "1mbit" }, each = "process" },
  -- Sync clients: each connection at most 1 Mbit/s up, so one big upload cannot hog the link.
  sync = { prio = 5, ceil = { up = "1mbit" }, each = "connection" },
  -- All cloud backup together: 2 Mbit/s up.
  backup = { prio = 7, ceil = { up = "2mbit" } },
  default = { prio = 4 },
}

local realtime = { "zoom", "steam", "discord" }
local updaters = { "http", "apt*", "dnf", "packagekitd", "fwupd*" }
local sync = { "syncthing", "dropbox", "nextcloud*" }

function classify(conn, ctx)
  local p = conn.process
  if not p then return "default" end
  local name = p.name -- each field read asks shaper, so read it once
  if shaper.glob(name, realtime) and conn.proto == "udp" then return "realtime" end
  if shaper.glob(name, updaters) or p.unit == "apt-daily-upgrade.service" then return "updaters" end
  if shaper.glob(name, sync) then return "sync" end
  if name == "rsync" or name == "restic" then return "backup" end
  return "default"
end
