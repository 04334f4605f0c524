#!/bin/sh
# Start the fortune example under Puma on $HOST:$PORT (127.0.0.1:4567 by
# default). Under micro-sidecar's supervisor mode PORT is set by the sidecar.
# exec, so Puma is the process that receives the sidecar's SIGTERM.
set -eu
cd "$(dirname "$0")"
: "${PORT:=4567}"
: "${HOST:=127.0.0.1}"
export RACK_ENV="${RACK_ENV:-production}"
exec puma -C puma.rb -b "tcp://${HOST}:${PORT}" config.ru
