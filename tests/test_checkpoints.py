import os

import pytest
import torch

from octlightning.checkpoints import UnsafeCheckpointError, load_state_dict
from octlightning.errors import ConfigError


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
    with pytest.raises(ConfigError, match=r"weights file not found: .*missing.pth .*; set --x to a local weights"):
        load_state_dict(tmp_path / "missing.pth", option="--x")


def test_the_cli_refuses_a_checkpoint_that_would_run_code(drive_root, tmp_path):
    import pickle

    from octlightning.cli import run_cli
    from tests.conftest import REPO, TINY_VESSEL

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "payload": Exploit()}, evil)
    args = ["test", "--config", str(REPO / "hparams" / "vessel_unet.json"), "--data.init_args.root", str(drive_root),
            *TINY_VESSEL, "--trainer.default_root_dir", str(tmp_path / "runs"), "--comet", "false",
            "--ckpt_path", str(evil)]  # fmt: skip
    with pytest.raises(pickle.UnpicklingError):
        run_cli(args)
    assert not marker.exists()
