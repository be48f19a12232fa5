#!/bin/sh
# Writes the per-detector systemd drop-ins std-daq needs beside the unit templates:
#   std-daq@<det>.target.d/receivers.conf          Wants= std-udp-recv@<det>-0 .. <det>-<n-1>
#   std-udp-recv@<det>-<m>.service.d/std-daq.conf  PartOf= the target, After= the assembler
#                                                  (receivers stop first), the detector's env
#                                                  file, and the CPU of module m (--cpu)
#   with WRITERS=N (N > 1, the config's number_of_writers):
#   std-daq@<det>.target.d/writers.conf            Wants= std-h5-writer-k@<det>-1 .. <det>-<N-1>
#   std-h5-writer-k@<det>-<k>.service.d/std-daq.conf  PartOf= the target, the detector's env file
# Usage: add-detector.sh DETECTOR N_MODULES [CPU_OF_MODULE_0 CPU_OF_MODULE_1 ...]
# UNIT_DIR (default /etc/systemd/system) is where the drop-ins go. Then:
#   systemctl daemon-reload && systemctl enable --now std-daq@DETECTOR.target
set -eu

usage() { echo "usage: $0 DETECTOR N_MODULES [CPU ...] (one CPU per module, or none)" >&2; exit 2; }
[ $# -ge 2 ] || usage
det=$1 n=$2
shift 2
case $det in "" | -* | *[!A-Za-z0-9_.-]*) echo "$0: bad detector name '$det'" >&2; exit 2 ;; esac
case $n in "" | *[!0-9]* | 0) echo "$0: N_MODULES must be a positive number, got '$n'" >&2; exit 2 ;; esac
if [ $# -ne 0 ] && [ $# -ne "$n" ]; then
    echo "$0: give one CPU per module ($n) or none, got $#" >&2
    exit 2
fi
for cpu in "$@"; do
    case $cpu in "" | *[!0-9]*) echo "$0: CPU must be a number, got '$cpu'" >&2; exit 2 ;; esac
done

unit_dir=${UNIT_DIR:-/etc/systemd/system}
target_d="$unit_dir/std-daq@$det.target.d"
mkdir -p "$target_d"

wants=""
m=0
while [ "$m" -lt "$n" ]; do
    cpu=""
    if [ $# -gt 0 ]; then cpu=$1; shift; fi
    d="$unit_dir/std-udp-recv@$det-$m.service.d"
    mkdir -p "$d"
    cat >"$d/std-daq.conf" <<CONF
# Written by add-detector.sh for detector $det, module $m.
[Unit]
PartOf=std-daq@$det.target
After=std-assembler@$det.service

[Service]
EnvironmentFile=-/etc/std-daq/$det.env
Environment=STD_DAQ_RECV_CPU=$cpu
CONF
    echo "wrote $d/std-daq.conf"
    wants="$wants std-udp-recv@$det-$m.service"
    m=$((m + 1))
done

writers=${WRITERS:-1}
case $writers in "" | *[!0-9]* | 0) echo "$0: WRITERS must be a positive number, got '$writers'" >&2; exit 2 ;; esac
writer_wants=""
k=1
while [ "$k" -lt "$writers" ]; do
    d="$unit_dir/std-h5-writer-k@$det-$k.service.d"
    mkdir -p "$d"
    cat >"$d/std-daq.conf" <<CONF
# Written by add-detector.sh for detector $det, writer $k of $writers.
[Unit]
PartOf=std-daq@$det.target
# Stops after the assembler, like writer 0, so the assembler drains into every writer.
Before=std-assembler@$det.service

[Service]
EnvironmentFile=-/etc/std-daq/$det.env
CONF
    echo "wrote $d/std-daq.conf"
    writer_wants="$writer_wants std-h5-writer-k@$det-$k.service"
    k=$((k + 1))
done
if [ -n "$writer_wants" ]; then
    cat >"$target_d/writers.conf" <<CONF
# Written by add-detector.sh: writers 1..$((writers - 1)) of detector $det (writer 0 is std-h5-writer@$det).
[Unit]
Wants=${writer_wants# }
CONF
    echo "wrote $target_d/writers.conf"
else
    rm -f "$target_d/writers.conf"
fi

cat >"$target_d/receivers.conf" <<CONF
# Written by add-detector.sh: the $n receivers of detector $det.
[Unit]
Wants=${wants# }
CONF
echo "wrote $target_d/receivers.conf"
