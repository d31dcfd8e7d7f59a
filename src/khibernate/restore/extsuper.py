"""The ext2/ext3/ext4 superblock: the fields that say whether a filesystem was mounted since a moment (reader and
writer side by side; the writer makes test filesystems' superblocks and documents the layout).

The superblock sits 1024 bytes into the device (Documentation/filesystems/ext4/super.rst).  What khibernate reads:
the UUID (which filesystem), and three things every read-write mount changes while none of them changes as long as
the filesystem stays mounted — ``s_mnt_count`` (+1 at each read-write mount or remount), ``s_mtime`` (last mount
time, with ``s_mtime_hi``) and the INCOMPAT_RECOVER flag (set while mounted read-write with a journal; cleared by
a clean unmount, a journal replay or e2fsck).  A read-only mount with ``noload`` changes none of them and writes
nothing; a read-only mount that replays the journal clears RECOVER.  ``s_wtime`` and ``s_kbytes_written`` move
while mounted and are not used.
"""

from __future__ import annotations

import dataclasses
import uuid as uuidlib

from khibernate.layout import Layout
from khibernate.restore.errors import NotExtError as NotExtError

OFFSET = 1024  # bytes from the start of the device
MAGIC = 0xEF53
INCOMPAT_RECOVER = 0x4  # the journal needs recovery: mounted read-write (or crashed while mounted)
INCOMPAT_JOURNAL_DEV = 0x8  # an external journal device, not a filesystem
COMPAT_HAS_JOURNAL = 0x4

SUPER = Layout("ext4_super_block", "<", [
    ("s_inodes_count", "I"), ("s_blocks_count_lo", "I"), ("s_r_blocks_count_lo", "I"),
    ("s_free_blocks_count_lo", "I"), ("s_free_inodes_count", "I"), ("s_first_data_block", "I"),
    ("s_log_block_size", "I"), ("s_log_cluster_size", "I"), ("s_blocks_per_group", "I"),
    ("s_clusters_per_group", "I"), ("s_inodes_per_group", "I"), ("s_mtime", "I"), ("s_wtime", "I"),
    ("s_mnt_count", "H"), ("s_max_mnt_count", "h"), ("s_magic", "H"), ("s_state", "H"), ("s_errors", "H"),
    ("s_minor_rev_level", "H"), ("s_lastcheck", "I"), ("s_checkinterval", "I"), ("s_creator_os", "I"),
    ("s_rev_level", "I"), ("s_def_resuid", "H"), ("s_def_resgid", "H"), ("s_first_ino", "I"),
    ("s_inode_size", "H"), ("s_block_group_nr", "H"), ("s_feature_compat", "I"), ("s_feature_incompat", "I"),
    ("s_feature_ro_compat", "I"), ("s_uuid", "16s"), ("s_volume_name", "16s"), ("s_last_mounted", "64s"),
    ("_to_hi_times", "428x"), ("s_wtime_hi", "B"), ("s_mtime_hi", "B"),
])
assert SUPER.offsets["s_uuid"] == 0x68 and SUPER.offsets["s_mtime_hi"] == 0x275
READ_BYTES = OFFSET + SUPER.size  # what to read from the start of the device


@dataclasses.dataclass(frozen=True)
class ExtState:
    """An ext filesystem's identity and the on-disk marks of its last mount."""

    uuid: str
    mount_count: int
    mount_time: int  # seconds since the epoch
    needs_recovery: bool
    journal: bool

    def describe(self) -> str:
        import time

        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.mount_time)) if self.mount_time else "never"
        return (f"mount count {self.mount_count}, last mounted {when} UTC, journal "
                + ("in use (needs recovery)" if self.needs_recovery else "clean" if self.journal else "none"))


def parse(data: bytes) -> ExtState:
    """The state in the first READ_BYTES of a device; NotExtError when they hold no ext superblock."""
    f = SUPER.unpack(data, OFFSET, error=NotExtError, what="ext superblock")
    if f["s_magic"] != MAGIC or f["s_feature_incompat"] & INCOMPAT_JOURNAL_DEV:
        raise NotExtError("no ext2/3/4 filesystem (magic 0xEF53 missing, or an external journal device)")
    return ExtState(uuid=str(uuidlib.UUID(bytes=f["s_uuid"])), mount_count=f["s_mnt_count"],
                    mount_time=f["s_mtime"] | f["s_mtime_hi"] << 32,
                    needs_recovery=bool(f["s_feature_incompat"] & INCOMPAT_RECOVER),
                    journal=bool(f["s_feature_compat"] & COMPAT_HAS_JOURNAL))


def build(state: ExtState, **fields: int | bytes) -> bytes:
    """READ_BYTES holding a superblock with ``state`` (and any other SUPER ``fields``): the writer of :func:`parse`."""
    values: dict[str, int | bytes] = {
        "s_magic": MAGIC, "s_rev_level": 1, "s_uuid": uuidlib.UUID(state.uuid).bytes,
        "s_mnt_count": state.mount_count & 0xFFFF, "s_mtime": state.mount_time & 0xFFFFFFFF,
        "s_mtime_hi": state.mount_time >> 32 & 0xFF,
        "s_feature_incompat": INCOMPAT_RECOVER if state.needs_recovery else 0,
        "s_feature_compat": COMPAT_HAS_JOURNAL if state.journal else 0}
    values.update(fields)
    return bytes(OFFSET) + SUPER.pack(**values)
