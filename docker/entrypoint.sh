#!/bin/sh
# std-daq container entrypoint (std_daq_service container contract).
#
#   docker run std-daq std-udp-recv --module 0      the service is the first argument ...
#   docker run -e STD_DAQ_SERVICE=std-assembler std-daq     ... or STD_DAQ_SERVICE
#
# Services: std-udp-recv, std-assembler, std-h5-writer, std-writer-agent, std-stream-send,
# std-stream-recv, std-det-sim, std-daq (short forms without "std-" work too). Other arguments go
# to the service unchanged.
#
# Config: /std_daq_service/config.json when it is mounted (STD_DAQ_CONFIG names another file),
# passed as --config. Otherwise from Redis key config.<SERVICE_NAME> at REDIS_HOST:REDIS_PORT:
# std-udp-recv, std-assembler and std-h5-writer read it themselves; for the services that only
# take a file (std-writer-agent, std-stream-send, std-stream-recv) this script fetches it first.
# REDIS_SKIP=1 turns status reporting to Redis off. An explicit --config argument wins.
# STD_DAQ_BIN_DIR (default /usr/local/bin) is where the binaries are.
set -eu

known() {
    case $1 in
    std-udp-recv | std-assembler | std-h5-writer | std-writer-agent | std-stream-send | \
        std-stream-recv | std-det-sim | std-recv-bench | std-daq) return 0 ;;
    *) return 1 ;;
    esac
}

service=""
if [ $# -gt 0 ]; then
    if known "$1"; then
        service=$1
        shift
    elif known "std-$1"; then
        service=std-$1
        shift
    fi
fi
if [ -z "$service" ]; then
    service=${STD_DAQ_SERVICE:-}
    case $service in std-*) ;; ?*) service=std-$service ;; esac
fi
if [ -z "$service" ]; then
    if [ $# -gt 0 ] && [ "$1" = "--help" ]; then
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
    fi
    echo "std-daq-entrypoint: no service: give it as the command or set STD_DAQ_SERVICE" >&2
    exit 2
fi
if ! known "$service"; then
    echo "std-daq-entrypoint: unknown service '$service'" >&2
    exit 2
fi

has_config=no
for a in "$@"; do
    case $a in --config | --config=*) has_config=yes ;; esac
done

config_file=${STD_DAQ_CONFIG:-/std_daq_service/config.json}
if [ "$has_config" = yes ] || [ "$service" = std-daq ] || [ "$service" = std-recv-bench ]; then
    :
elif [ -f "$config_file" ]; then
    set -- --config "$config_file" "$@"
else
    if [ -z "${SERVICE_NAME:-}" ]; then
        echo "std-daq-entrypoint: no $config_file mounted and SERVICE_NAME is not set, so there is no config.<SERVICE_NAME> to read from Redis" >&2
        exit 2
    fi
    case $service in
    std-writer-agent | std-stream-send | std-stream-recv | std-det-sim)
        fetched=${TMPDIR:-/tmp}/std-daq-config.$SERVICE_NAME.json
        if ! redis-cli -h "${REDIS_HOST:-127.0.0.1}" -p "${REDIS_PORT:-6379}" --raw \
            GET "config.$SERVICE_NAME" >"$fetched" || [ -z "$(cat "$fetched")" ]; then
            echo "std-daq-entrypoint: cannot read Redis key config.$SERVICE_NAME from ${REDIS_HOST:-127.0.0.1}:${REDIS_PORT:-6379}" >&2
            exit 1
        fi
        set -- --config "$fetched" "$@"
        ;;
    esac
fi

exec "${STD_DAQ_BIN_DIR:-/usr/local/bin}/$service" "$@"
