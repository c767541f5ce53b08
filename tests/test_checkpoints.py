import os

import pytest
import torch

from octlightning.checkpoints import UnsafeCheckpointError, load_state_dict


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Exploit()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_state_dict(path)


def test_nested_state_dicts_are_unwrapped(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.pth")
