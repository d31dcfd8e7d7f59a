"""`khibernate setup`: wire khibernate into this system's boot (resume configuration, initramfs, systemd)."""
