import subprocess
import sys


def test_import_metadyn_pulls_no_optional_package():
    code = (
        "import sys, metadyn, metadyn.core.backbones, metadyn.core.inference, metadyn.core.policies, "
        "metadyn.core.calibration, metadyn.core.flops, metadyn.core.train, metadyn.config, metadyn.data\n"
        "bad = [m for m in ('torchvision', 'matplotlib', 'learn2learn', 'higher', 'sklearn') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
