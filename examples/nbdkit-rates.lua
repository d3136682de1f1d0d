-- nbdkit's rate filter, as a policy: a limit for each connection, changed live through a file.
--
-- nbdkit takes `connection-rate=` and `connection-rate-file=`; here the file is read every
-- cycle with ctx.rate_file(path, default), with nbdkit's rules: a file absent at start means the
-- default, a file deleted later keeps the last value, a malformed file keeps the last value.
-- Write it atomically (`echo 2mbit:8mbit > f.tmp && mv f.tmp f`). The whole-link rate
-- (nbdkit's `rate=`) is the class ceiling, read from a second file.
--
--   echo 1mbit > /run/shaper/connection-rate
--   echo 20mbit:100mbit > /run/shaper/rate

local RATE_FILE = "/run/shaper/rate"
local CONNECTION_RATE_FILE = "/run/shaper/connection-rate"

function classes(ctx)
  return { default = { prio = 4, ceil = ctx.rate_file(RATE_FILE, "unlimited") } }
end

function classify(conn, ctx)
  return "default", ctx.rate_file(CONNECTION_RATE_FILE, "unlimited")
end
