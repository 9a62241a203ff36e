#!/bin/sh
# Yun test guest: GET / -> one "key=value" line per fact, plain text.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
RUN=/run/yun-guest
STATE=/var/lib/yun-guest
read -r up _ </proc/uptime
ips=""
for f in "$RUN"/ip.*; do
    [ -f "$f" ] && ips="${ips:+$ips,}${f##*/ip.}:$(cat "$f")"
done
disks=""
for d in /sys/block/*; do
    case "${d##*/}" in loop*|ram*|sr*|fd*) continue ;; esac
    disks="${disks:+$disks,}${d##*/}"
done
echo "Content-Type: text/plain"
echo ""
echo "hostname=$(hostname)"
echo "hostname_source=$(cat "$RUN/hostname-source" 2>/dev/null)"
echo "uptime=${up%.*}"
echo "boots=$(cat "$STATE/boots" 2>/dev/null)"
echo "token=$(cat "$STATE/token" 2>/dev/null)"
echo "instance_id=$(cat "$RUN/instance-id" 2>/dev/null)"
echo "ips=$ips"
echo "disks=$disks"
echo "cpus=$(grep -c '^processor' /proc/cpuinfo)"
iid=$(cat "$RUN/instance-id" 2>/dev/null)
echo "userdata_rc=$(cat "$STATE/user-data.done.${iid:-none}" 2>/dev/null)"
echo "mem_kb=$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\).*/\1/p' /proc/meminfo)"
