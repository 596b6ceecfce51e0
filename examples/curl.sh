#!/bin/sh
# Get a token from credbroker's plain HTTP API with curl: no CLI, no gRPC. Prints the access token.
# usage: curl.sh SCOPE...   (CREDBROKER_SOCKET)
set -eu
socket=${CREDBROKER_SOCKET:-/run/credbroker/credbroker.sock}
n=$#
for scope do
  set -- "$@" --data-urlencode "scope=$scope"
done
shift "$n"
if ! body=$(curl --silent --show-error --fail-with-body --get --unix-socket "$socket" \
  -H 'Credbroker-Request: true' "$@" http://localhost/v1/token); then
  echo "credbroker: $body" >&2
  exit 1
fi
printf '%s\n' "$body" | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p'
