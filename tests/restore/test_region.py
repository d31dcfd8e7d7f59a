"""Where the restore kernel runs: the crash region the image was saved from, found from this boot's RAM."""

from __future__ import annotations

from khibernate.ranges import Range
from khibernate.restore.region import restore_window, saved_region

LOW = Range(0x1000, 0x9F000)
RAM_2G = [Range(0x1000, 0x9FC00), Range(0x100000, 0x7FFDF000)]


def _image(region: Range) -> list[Range]:
    """What a jump from a boot with crash region ``region`` saves: RAM minus low RAM minus the region, as the
    capture kernel's /proc/vmcore gives it (byte ranges, the partial page at 0x9f000 included)."""
    return [Range(0x9F000, 0x9FC00), Range(0x100000, region.start), Range(region.end, 0x7FFDF000)]


def test_the_saved_region_is_what_the_image_leaves_out() -> None:
    saved = Range(0x6B000000, 0x7B000000)  # KASLR put the hibernating boot's kernel at the top: region below it
    assert saved_region(_image(saved), 4096, RAM_2G, LOW) == saved


def test_another_region_this_boot_is_swapped_the_same_one_is_not() -> None:
    saved = Range(0x6B000000, 0x7B000000)
    elsewhere = restore_window(_image(saved), 4096, RAM_2G, LOW, Range(0x6E000000, 0x7E000000))
    assert elsewhere is not None and elsewhere.window == saved and not elsewhere.reserved
    assert elsewhere.swapped_bytes == 256 << 20 and "swapping this boot's 256 MiB" in elsewhere.describe()
    same = restore_window(_image(saved), 4096, RAM_2G, LOW, saved)
    assert same is not None and same.reserved and same.swapped_bytes == 0
    inside = restore_window(_image(saved), 4096, RAM_2G, LOW, Range(0x60000000, 0x7C000000))  # a larger region
    assert inside is not None and inside.reserved
    none = restore_window(_image(saved), 4096, RAM_2G, LOW, None)  # this boot reserved nothing (KASLR collided)
    assert none is not None and none.window == saved and not none.reserved
    assert "this boot has no crash region" in none.describe()


def test_an_image_of_other_memory_has_no_region_here() -> None:
    saved = Range(0x6B000000, 0x7B000000)
    more_ram = [Range(0x1000, 0x9FC00), Range(0x100000, 0x7FFDF000), Range(0x100000000, 0x120000000)]
    assert saved_region(_image(saved), 4096, more_ram, LOW) is None  # two gaps: another -m
    less_ram = [Range(0x1000, 0x9FC00), Range(0x100000, 0x5FFDF000)]
    assert saved_region(_image(saved), 4096, less_ram, LOW) is None  # the image holds memory this boot lacks
    assert restore_window(_image(saved), 4096, less_ram, LOW, None) is None
    assert saved_region(_image(saved) + [Range(saved.start, saved.end)], 4096, RAM_2G, LOW) is None  # no gap


def test_crashkernel_words_and_kaslr() -> None:
    from khibernate.restore.region import kaslr_on, memparse, parse_crashkernel

    assert [memparse(t) for t in ("256M", "1G", "0x10000000", "64k", "12", "x", "")] == [
        256 << 20, 1 << 30, 0x10000000, 64 << 10, 12, None, None]
    arg = parse_crashkernel("ro crashkernel=128M crashkernel=256M@0x10000000 quiet")
    assert arg is not None and (arg.size, arg.offset, arg.text) == (256 << 20, 0x10000000, "256M@0x10000000")
    high = parse_crashkernel("crashkernel=512M,high crashkernel=72M,low")
    assert high is not None and (high.size, high.offset) == (512 << 20, None)
    ranged = parse_crashkernel("crashkernel=1G-4G:192M,4G-64G:256M")
    assert ranged is not None and ranged.size is None and ranged.offset is None
    assert parse_crashkernel("console=ttyS0") is None
    assert kaslr_on("ro nokaslr", {"CONFIG_RANDOMIZE_BASE": "y"}) is False
    assert kaslr_on("ro", {"CONFIG_RANDOMIZE_BASE": "y"}) is True
    assert kaslr_on("ro", {}) is False and kaslr_on("ro", None) is None
