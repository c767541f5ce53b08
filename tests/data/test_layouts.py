"""Every public dataset as distributed, on its published recipe with only the root changed.

Each case writes a tiny replica in the dataset's own layout (``tests/fixtures/``) and runs
``octlightning check-data`` and a one-step ``fit`` through the command, with the published hparams
file, ``--data.init_args.root`` and the settings README's "Datasets as distributed" table gives for
that dataset (read from README, so the table and the tests cannot drift apart), plus CPU trainer flags
and a smaller network (model settings only).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from octlightning.commands import main
from octlightning.conversion.synthetic import write_drive_layout
from tests.conftest import CPU_TRAINER, REPO, run_octlightning
from tests.data.test_oct_layers import TINY_SEGFORMER
from tests.fixtures.fundus import write_chase_layout, write_kaggle_layout
from tests.fixtures.isic import write_isic_layout
from tests.fixtures.kvasir import write_kvasir_layout
from tests.fixtures.mirage import write_mirage_layout
from tests.fixtures.oct_layers import write_duke_amd_export, write_oct_h5
from tests.fixtures.ph2 import write_ph2_layout


def readme_settings() -> dict[str, tuple[str, list[str]]]:
    """``{dataset: (recipe file, settings)}`` from README's "Datasets as distributed" table, keyed by
    the test id its last column names (``[...]``; the RETOUCH row names its own test)."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Datasets as distributed", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| (.+?) \| `(\w+\.json)` \| `(.*?)` \| `(.+?)` \|$", line)
        if m:
            test_id = re.search(r"\[(.+)\]$", m.group(4))
            rows[test_id.group(1) if test_id else m.group(1)] = (m.group(2), shlex.split(m.group(3)))
    return rows


# dataset (README's name) -> replica writer taking a folder and returning the root to pass, and what
# check-data must report for it
REPLICAS: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "DRIVE": (lambda d: write_drive_layout(d / "DRIVE", n_train=4, n_test=2, size=(40, 44)), ["train: 3", "test: 2"]),
    "CHASE_DB1": (lambda d: write_chase_layout(d / "CHASE_DB1"), ["train: 4", "val: 2", "test: 2"]),
    "Kaggle retina-blood-vessel": (lambda d: write_kaggle_layout(d / "kaggle"), ["test: 2", "values [0.0, 1.0]"]),
    "ISIC 2018 Task 1": (lambda d: write_isic_layout(d / "ISIC2018"), ["test: 2"]),
    "Kvasir-SEG": (lambda d: write_kvasir_layout(d / "Kvasir-SEG"), ["values [0.0, 1.0]"]),
    "PH2": (lambda d: write_ph2_layout(d / "PH2Dataset"), ["values [0.0, 1.0]"]),
    "Duke DME HDF5": (lambda d: write_oct_h5(d / "duke_dme.h5"), ["coords"]),
    "Duke AMD HDF5": (lambda d: write_duke_amd_export(d / "duke_amd.h5"), ["coords"]),
    "MIRAGE": (
        lambda d: write_mirage_layout(d / "mirage", ["Background", "Retina", "Fluid"], [0, 128, 255]),
        ["values [0.0, 1.0, 2.0]"],
    ),
}

# The networks shrunk for a 2-core CPU (model settings only: the data settings stay the published
# ones, which is what these tests check); the MIRAGE recipe's weights file is not here either.
NET = "--model.init_args.net.init_args."
SMALL_NET = {
    "vessel_unet.json": [NET + "base_channels", "8", NET + "depth", "2"],
    "isic_deeplabv3plus.json": [NET + "encoder_name", "resnet18"],
    "oct_segformer.json": [NET + "config", TINY_SEGFORMER],
    "duke_dme_foundation.json": [NET + "preset", "tiny", NET + "weights", "null", NET + "decoder_channels", "8",
                                 NET + "decoder_depth", "1"],
}  # fmt: skip


def test_readme_table_has_a_replica_for_every_dataset_it_lists():
    listed = {name for name in readme_settings() if name != "RETOUCH"}
    assert listed == set(REPLICAS)


@pytest.mark.parametrize("dataset", list(REPLICAS))
def test_published_recipe_reads_the_dataset_as_distributed(dataset, tmp_path, capsys):
    recipe, settings = readme_settings()[dataset]
    writer, reported = REPLICAS[dataset]
    root = writer(tmp_path)
    config = ["--config", str(REPO / "hparams" / recipe), "--data.init_args.root", str(root), *settings]
    # check-data builds no model: the command's own entry point, in this process
    with pytest.raises(SystemExit) as done:
        main(["check-data", *config])
    out = capsys.readouterr().out
    assert done.value.code == 0 and ": OK" in out, out
    for text in reported:
        assert text in out, f"{text!r} not in\n{out}"
    runs = tmp_path / "runs"
    # check-data above read every sample of every split: no sanity validation before the step
    trainer = [*CPU_TRAINER, "--trainer.num_sanity_val_steps", "0", "--trainer.max_steps", "1", "--comet", "false"]
    trainer += ["--trainer.default_root_dir", str(runs)]
    run_octlightning(["fit", *config, *SMALL_NET[recipe], *trainer])
    (ckpt,) = runs.rglob("last.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 1
