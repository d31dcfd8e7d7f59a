import pytest

from khibernate.jump import api
from khibernate.jump.errors import JumpBackEntryError


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """api with the kernel replaced: a loaded flag, a boot id, a peer page, and a log of loads/execs."""
    box = {"loaded": False, "boot": "boot-1", "loads": [], "execs": 0}
    monkeypatch.setattr(api, "RUN_DIR", tmp_path)
    monkeypatch.setattr(api, "_boot_id", lambda: box["boot"])
    monkeypatch.setattr(api, "state", lambda: api.LoadedState(box["loaded"], False, None))
    monkeypatch.setattr(api, "read_phys_page", lambda addr: bytes(4096))

    def load_plan(plan):
        box["loads"].append(plan)
        box["loaded"] = True

    def execute():
        box["execs"] += 1
        return api.JumpResult(5.0, 0.1)

    monkeypatch.setattr(api, "load_plan", load_plan)
    monkeypatch.setattr(api, "execute", execute)
    return box


def test_jump_back_loads_once_per_boot(fake):
    entry, reused, result = api.jump_back(0x4060F2)
    assert (entry, reused) == (0x4060F2, False) and len(fake["loads"]) == 1
    assert fake["loads"][0].segments[0].mem == 0x406000
    entry, reused, _ = api.jump_back(0x4060F2)  # the peer resumed us; the same image is used again
    assert reused and len(fake["loads"]) == 1 and fake["execs"] == 2


def test_reload_after_round_trip_refused(fake):
    api.jump_back(0x4060F2)
    fake["loaded"] = False  # someone unloaded the image after the round trip
    with pytest.raises(JumpBackEntryError, match="stale"):
        api.jump_back(0x4060F2)
    assert len(fake["loads"]) == 1


def test_other_image_loaded_refused(fake):
    fake["loaded"] = True
    with pytest.raises(JumpBackEntryError, match="unload"):
        api.prepare_jump_back(0x4060F2)
    assert not fake["loads"]


def test_new_boot_loads_again(fake):
    api.jump_back(0x4060F2)
    fake["boot"], fake["loaded"] = "boot-2", False
    _, reused, _ = api.jump_back(0x5550F2)
    assert not reused and len(fake["loads"]) == 2
