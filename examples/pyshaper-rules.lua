-- pyshaper's rule examples, ported.
--
-- pyshaper matched each connection against rules written as Python expressions over `cmd`,
-- `args`, `user`, `pid` and the address and port of both ends, and put it in a class with an
-- upload/download rate. The same rules in shaper's Lua (one if per rule, first match wins):
--
--   rule "ftp"      test: cmd == 'ftp'                        class: slow    (up 5 KB/s)
--   rule "bob"      test: user == 'bob' and dport == 80       class: web-bob (down 64 KB/s)
--   rule "mirror"   test: 'rsync' in cmd and daddr.startswith('192.0.2.')  class: backup
--   rule "default"                                            class: default

local shaper = require("shaper")

classes = {
  slow = { prio = 6, ceil = { up = "5KB/s" } },
  ["web-bob"] = { prio = 5, ceil = { down = "64KB/s" } },
  backup = { prio = 7, ceil = "1mbit" },
  default = { prio = 4 },
}

local backup_hosts = shaper.cidr("192.0.2.0/24")

function classify(conn, ctx)
  local p = conn.process
  local cmd = p and p.name or ""
  if cmd == "ftp" then return "slow" end
  if p and p.user == "bob" and conn.remote_port == 80 then return "web-bob" end
  if cmd:find("rsync", 1, true) and backup_hosts:contains(conn.remote_addr) then return "backup" end
  return "default"
end
