-- Per-process priorities: interactive ssh and voice first, browsers next, torrents last.
--
-- No limits at all: on an idle link everyone may use it all, but when it is busy, HTB serves
-- the lower `prio` first. The process tree matters: a browser's network and content processes
-- have other names, so they are recognised by their ancestor.

local shaper = require("shaper")

classes = {
  interactive = { prio = 0, description = "ssh, calls" },
  browsing = { prio = 2 },
  default = { prio = 4 },
  torrents = { prio = 7 },
}

local browsers = { "firefox", "chrom*", "brave*" }
local p2p = shaper.ports(51413, "6881-6889")

local interactive = { "ssh", "mosh-client", "zoom", "teams*", "discord", "signal-desktop", "mumble" }

function classify(conn, ctx)
  local p = conn.process
  local name = p and p.name -- each field read asks shaper, so read it once
  if shaper.glob(name, interactive) then return "interactive" end
  if shaper.glob(name, browsers) or (p and p:descends_from("firefox")) then return "browsing" end
  if p2p:contains(conn.local_port) or shaper.glob(name, "transmission*") then return "torrents" end
  return "default"
end
