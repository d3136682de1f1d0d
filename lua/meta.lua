---@meta
-- Type annotations for shaper policies (LuaCATS, read by lua-language-server).
-- Add this folder to `workspace.library` in your .luarc.json for completion and checks:
--   { "workspace.library": ["/usr/share/shaper/lua"], "runtime.version": "Lua 5.4" }

---@class Conn
---@field proto "tcp"|"udp"
---@field family 4|6
---@field local_addr string       # "192.168.1.10", "2a02:8070::10" (IPv4-mapped IPv6 shown as IPv4)
---@field local_port integer
---@field remote_addr string      # "0.0.0.0" / "::" for unconnected UDP
---@field remote_port integer     # 0 for unconnected UDP
---@field remote_host string|nil  # the name this machine last looked up for remote_addr (from DNS answers it received), nil if none
---@field state string            # "established", "syn_sent", "fin_wait1", … ("close" = unconnected UDP)
---@field uid integer             # the socket's owner uid
---@field bytes_up integer|nil    # bytes sent and acknowledged (TCP)
---@field bytes_down integer|nil  # bytes received (TCP)
---@field rate_up number          # recent upload rate, bit/s
---@field rate_down number        # recent download rate, bit/s
---@field age number              # seconds since shaper first saw the connection
---@field tokens_up number|nil     # token-bucket level (bytes) for a connection with its own limit
---@field tokens_down number|nil
---@field process Process|nil     # nil when no process holds the socket (or it is not visible)

---@class Process
---@field pid integer
---@field ppid integer
---@field name string             # the kernel's short name (comm), at most 15 characters
---@field exe string|nil          # executable path
---@field cmdline string[]        # arguments, cmdline[1] is the program
---@field uid integer
---@field user string|nil
---@field gid integer
---@field cgroup string|nil       # cgroup v2 path, e.g. "/system.slice/nginx.service"
---@field unit string|nil         # systemd unit, e.g. "nginx.service", "app-firefox-1234.scope"
---@field start_time integer     # start time in clock ticks since boot; with pid, identifies the process
---@field parent Process|nil
---@field ancestors Process[]     # parent first, up to init
local Process = {}

--- Whether an ancestor (not the process itself) has this name or pid.
---@param name_or_pid string|integer
---@return boolean
function Process:descends_from(name_or_pid) end

---@class Time
---@field year integer
---@field month integer   # 1-12
---@field day integer     # 1-31
---@field hour integer    # 0-23
---@field min integer
---@field sec integer
---@field wday integer    # 1 = Sunday … 7 = Saturday, as os.date("*t")
---@field yday integer
---@field isdst boolean

---@class Usage
---@field up integer      # bytes
---@field down integer
---@field total integer

---@class ClassFigures
---@field connections integer
---@field rate_up number
---@field rate_down number
---@field tokens_up number|nil   # token-bucket level (bytes) of a class with a ceiling
---@field tokens_down number|nil

---@alias Rate number|string            # bit/s, or a string with a unit: "2mbit", "500KB/s"
---@alias Limit Rate|{up: Rate|nil, down: Rate|nil}

---@class Ctx
---@field now integer        # Unix time of the cycle
---@field time Time          # local time of the cycle
---@field interface string|nil
---@field rate {up: integer|nil, down: integer|nil}|nil             # --rate (or its file), bit/s; nil = none
---@field connection_rate {up: integer|nil, down: integer|nil}|nil  # --connection-rate (or its file)
local Ctx = {}

--- Bytes moved in the current period ("hour", "day", "week", "month") by `key`:
--- "link" (default: the whole interface), "process:NAME", "user:NAME" or "class:NAME".
--- With `ago`, the period that many before the current one: `ctx.usage("day", "link", 1)` is
--- yesterday. Past hours (48), days (400) and months (36) are kept, weeks are not; a name
--- outside a past period's top names counts under "process:(other)" (and so on).
---@param period "hour"|"day"|"week"|"month"
---@param key string|nil
---@param ago integer|nil   # 0 (default): the current period
---@return Usage
function Ctx.usage(period, key, ago) end

--- A class's figures this cycle.
---@param name string
---@return ClassFigures
function Ctx.class(name) end

--- A limit read from a file every cycle, with nbdkit's rules: absent at start → `default`;
--- deleted later → the last value; malformed → the last value. The file holds "UP[:DOWN]".
---@param path string
---@param default Limit|nil
---@return Limit|nil
function Ctx.rate_file(path, default) end

---@class ClassDef
---@field prio integer|nil                  # 0 (served first) … 7; default 4
---@field rate Limit|nil                    # guaranteed rate
---@field ceil Limit|nil                    # maximum rate
---@field each "class"|"process"|"connection"|nil  # what rate/ceil apply to; default "class"
---@field description string|nil
---@field block boolean|nil                 # true: drop every packet of the class's connections

--- The classes: a table, or a function of ctx returning one. `default` always exists.
---@type table<string, ClassDef>|fun(ctx: Ctx): table<string, ClassDef>
classes = {}

--- Called for every connection every cycle: return a class name (nil = "default") and,
--- optionally, a limit for this one connection.
---@type fun(conn: Conn, ctx: Ctx): (string|nil), Limit|nil
classify = nil

--- Optional: called once per cycle before any classify.
---@type fun(ctx: Ctx)|nil
on_cycle = nil

--- Optional: where a connection goes when its classify fails. "previous" (the default): its
--- earlier decision, else what another connection of its process got, else "default";
--- "default"; or a declared class name (e.g. a slow one, to fail closed).
---@type "previous"|"default"|string|nil
on_error = nil
