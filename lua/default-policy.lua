-- shaper's default policy: priorities only, no limits.
--
-- Interactive traffic (ssh, DNS, video calls) is served first and bulk transfers (torrents,
-- package downloads, backups) last, but nothing is capped: on an idle link every class can use
-- it all. Edit this file to add limits, time windows or quotas; `shaper check` tests an edit and
-- `shaper reload` (or saving the file) applies it. Examples: /usr/share/doc/shaper/examples.
-- Reference: `man shaper-policy` or docs/policy.md.

local shaper = require("shaper")

classes = {
  interactive = { prio = 1, description = "ssh, DNS, voice and video calls" },
  default     = { prio = 4 },
  bulk        = { prio = 7, description = "torrents, updates, backups" },
}

local interactive_ports = shaper.ports(22, 53, 3478, "8801-8810", "19302-19309")
local bulk_programs = { "transmission*", "qbittorrent*", "deluge*", "aria2c", "rsync", "http", "steam" }

function classify(conn, ctx)
  if interactive_ports:contains(conn.remote_port) then return "interactive" end
  local p = conn.process
  if p and shaper.glob(p.name, bulk_programs) then return "bulk" end
  return "default"
end
