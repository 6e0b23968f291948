#!/bin/sh
# `docker run ddpm:latest train ...`, `docker run ddpm:latest ddpm train ...` and `docker run -it ddpm:latest bash`
# all do what they say: a leading "ddpm" is dropped, a command that is not a ddpm subcommand runs as itself.
set -e
if [ "${1:-}" = ddpm ]; then
    shift
elif [ -n "${1:-}" ] && [ "${1#-}" = "$1" ] && command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec ddpm "$@"
