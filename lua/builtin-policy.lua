-- The policy shaper runs without --script: every connection in the default class. The limits
-- come from --rate (the whole interface) and --connection-rate (each connection), or their
-- files, which shaper applies to every policy as defaults.
function classify(conn, ctx)
  return "default"
end
