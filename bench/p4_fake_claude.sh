#!/bin/sh
# Stands in for `claude` in the P4 bench: one stream-json init line, then it
# holds its slot (a real worker would be talking to the model) until killed.
echo '{"type":"system","subtype":"init","session_id":"p4-bench","model":"fake"}'
exec sleep 3600
