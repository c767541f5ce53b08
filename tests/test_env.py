import os
import subprocess
import sys

from octlightning.env import OFFLINE_DEFAULTS


def _env_after_import(env: dict[str, str]) -> dict[str, str]:
    code = "import os, json, octlightning; print(json.dumps(dict(os.environ)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout)


def test_offline_defaults_are_applied_without_overriding_the_user():
    base = {k: v for k, v in os.environ.items() if k not in OFFLINE_DEFAULTS and not k.startswith("COMET")}
    env = _env_after_import(base)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["NO_ALBUMENTATIONS_UPDATE"] == "1"
    assert env["COMET_ERROR_TRACKING_ENABLE"] == "false"
    assert env["COMET_START_ONLINE"] == "false"

    user = dict(base, HF_HUB_OFFLINE="0", COMET_API_KEY="k-123")
    env = _env_after_import(user)
    assert env["HF_HUB_OFFLINE"] == "0"
    assert "COMET_START_ONLINE" not in env  # a key means the user wants Comet online


def test_lightnings_cloud_tips_and_leafspec_deprecation_stay_off_the_console_but_its_messages_do_not():
    code = (
        "import octlightning\n"
        "from lightning.pytorch.utilities._pytree import _tree_flatten\n"
        "from lightning.pytorch.utilities.rank_zero import rank_zero_info\n"
        "_tree_flatten(1)\n"  # Lightning's pytree copy builds a LeafSpec, deprecated by torch 2.14
        "rank_zero_info('💡 Tip: For seamless cloud uploads and versioning, try installing litmodels')\n"
        "rank_zero_info('GPU available: False')\n"
    )
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True)
    out = proc.stdout + proc.stderr
    assert "GPU available: False" in out
    assert "Tip" not in out and "LeafSpec" not in out, out
