#!/bin/sh
# mmdebstrap customize hook of vmtest/rootfs.py: turns the minbase chroot "$1" into the Debian 12 test machine.
# Runs on the host as root with /proc, /sys and /dev mounted in the chroot and the Debian mirror reachable.
# Environment (set by vmtest/rootfs.py): KHB_DEPS (what khibernate's .deb depends on: downloaded into a local
# apt repository, NOT installed, so `apt install ./khibernate_*.deb` in the guest pulls them as from a mirror),
# KHB_KERNEL_DEB (a linux-image .deb to install) or KHB_KERNEL_TREE (a directory with boot/ and lib/modules/ to copy
# in), KHB_ROOT_UUID, KHB_HERE (this folder).
set -eu
root="$1"
in_root() { chroot "$root" "$@"; }

# zstd as Debian 12 has it, at level 1 instead of 9: every update-initramfs in the guest runs under TCG
sed -i 's/^COMPRESS=.*/COMPRESS=zstd/' "$root/etc/initramfs-tools/initramfs.conf"
echo "COMPRESSLEVEL=1" >> "$root/etc/initramfs-tools/initramfs.conf"

# 1. the kernel, installed as its package would be (its postinst runs update-initramfs -c), with FSTYPE=ext4 in
#    initramfs.conf meanwhile: initramfs-tools' fsck hook cannot see the root device from this chroot, while the
#    installer's initramfs, built with the root device present, carries fsck, logsave and fsck.ext4, and so does every
#    later update-initramfs in the booted guest (runs 13 and 14 of test_distro saw them appear after apt remove).
#    FSTYPE=auto, Debian's default, is put back afterwards (the setting in initramfs.conf wins over the environment).
conf="$root/etc/initramfs-tools/initramfs.conf"
grep -qx 'FSTYPE=auto' "$conf"
sed -i 's/^FSTYPE=auto$/FSTYPE=ext4/' "$conf"
if [ -n "${KHB_KERNEL_DEB:-}" ]; then
    cp "$KHB_KERNEL_DEB" "$root/tmp/kernel.deb"
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/kernel.deb
    rm "$root/tmp/kernel.deb"
fi
if [ -n "${KHB_KERNEL_TREE:-}" ]; then
    cp -a "$KHB_KERNEL_TREE/boot/." "$root/boot/"
    mkdir -p "$root/lib/modules"  # /lib is a symlink to usr/lib (merged /usr): copy into it, never over it
    cp -a "$KHB_KERNEL_TREE/lib/modules/." "$root/lib/modules/"
    for rel in $(ls "$KHB_KERNEL_TREE/lib/modules"); do
        in_root depmod -a "$rel"
        in_root update-initramfs -c -k "$rel"
    done
fi
sed -i 's/^FSTYPE=ext4$/FSTYPE=auto/' "$conf"
in_root sh -c 'lsinitramfs /boot/initrd.img-*' | grep -q 'sbin/fsck.ext4$'  # the fsck hook took it

# 2. khibernate's dependencies as a local apt repository (the guest has no network)
repo=/var/local/khibernate-deps
rm -f "$root"/var/cache/apt/archives/*.deb  # the bootstrap's own packages: installed already
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --download-only $KHB_DEPS
mkdir -p "$root$repo"
mv "$root"/var/cache/apt/archives/*.deb "$root$repo/"
(cd "$root$repo" && dpkg-scanpackages --multiversion . /dev/null > Packages 2>/dev/null && gzip -k9n Packages)
echo "deb [trusted=yes] file:$repo ./" > "$root/etc/apt/sources.list"
rm -f "$root"/etc/apt/sources.list.d/*
in_root apt-get update -q

# 3. the machine: root filesystem by UUID, a persistent journal, a fast boot, the test harness's agent on ttyS1
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$KHB_ROOT_UUID" > "$root/etc/fstab"
echo khb-debian > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 khb-debian\n' > "$root/etc/hosts"
mkdir -p "$root/var/log/journal"
in_root passwd -d root >/dev/null
install -D -m755 "$KHB_HERE/../../initramfs/usr/libexec/khibernate/vm-agent" "$root/usr/local/libexec/vmtest/vm-agent"
install -D -m644 "$KHB_HERE/vmtest-agent.service" "$root/etc/systemd/system/vmtest-agent.service"
in_root systemctl enable vmtest-agent.service
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         man-db.timer dpkg-db-backup.timer systemd-timesyncd.service; do
    in_root systemctl mask "$u" >/dev/null 2>&1 || true
done
in_root systemctl set-default multi-user.target
in_root apt-get clean
