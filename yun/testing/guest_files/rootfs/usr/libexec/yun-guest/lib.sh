# Yun test guest: shell helpers shared by the boot scripts (sourced).
RUN=/run/yun-guest
STATE=/var/lib/yun-guest

# marker TEXT: one line on the serial console (and the VGA console when there).
# The leading newline keeps it at the start of a line after a shell prompt.
marker() {
    printf '\n%s\n' "$*" >/dev/console
    printf '\n%s\n' "$*" >/dev/tty1 2>/dev/null
}

# set_hostname NAME SOURCE: SOURCE is dhcp, seed or default.
set_hostname() {
    hostname "$1"
    echo "$1" >/etc/hostname
    echo "$2" >"$RUN/hostname-source"
    if grep -q "^127.0.1.1" /etc/hosts 2>/dev/null; then
        sed -i "s/^127\.0\.1\.1.*/127.0.1.1 $1/" /etc/hosts
    else
        echo "127.0.1.1 $1" >>/etc/hosts
    fi
}

# start_dhcp NIC [wait]: DHCP client for NIC; with "wait", return once bound
# (or after about 20 s without a lease).
start_dhcp() {
    ifconfig "$1" up
    touch "$RUN/dhcp.$1"
    if [ "$2" = wait ]; then
        udhcpc -i "$1" -s /etc/udhcpc/default.script -x "hostname:$(hostname)" \
            -t 20 -T 1 -A 5 -b -S >/dev/null 2>&1
    else
        udhcpc -i "$1" -s /etc/udhcpc/default.script -x "hostname:$(hostname)" \
            -t 20 -T 1 -A 5 -b -S >/dev/null 2>&1 &
    fi
}
