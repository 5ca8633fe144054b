"""timm's own model contract: its ``tests/test_models.py`` (from the sdist of the installed timm, on PyPI) run on the
continuum models only (``timm_contract_plugin``): forward, backward, default configs, ``features_only``,
``forward_intermediates``, pruning, torch.fx, TorchScript. Slow (about 3 minutes).

Left out, each for a stated reason:
- downloading pretrained weights (``test_model_load_pretrained``, ``test_model_features_pretrained``: no network
  where the tests run);
- ``test_model_forward_features[1-continuum_inception_v3]``: the model is timm's ``inception_v3`` itself, which timm
  exempts from the feature-size check by name (``inception_v3*``: unpadded convs shrink small inputs);
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import timm

from continuum.files import atomic_write, cache_root

HERE = Path(__file__).resolve().parent

DESELECTED = "test_model_forward_features[1-continuum_inception_v3]"
"""timm exempts inception_v3 by name from the check this fails (see the module docstring)."""


def timm_test_file() -> Path:
    """timm's ``tests/test_models.py`` for the installed version: from the cache, else from its sdist on PyPI."""
    target = cache_root() / "timm-tests" / timm.__version__ / "test_models.py"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"timm=={timm.__version__}", "--dest", tmp], capture_output=True, text=True)
        if fetched.returncode != 0:
            pytest.skip(f"timm's sdist could not be fetched from PyPI: {fetched.stderr.strip()[-200:]}")
        (sdist,) = Path(tmp).glob("timm-*.tar.gz")
        with tarfile.open(sdist) as archive:
            member = archive.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/tests/test_models.py")
            content = member.read()
    atomic_write(target, lambda p: p.write_bytes(content))
    return target


@pytest.mark.slow
def test_timms_model_tests_pass_on_the_continuum_models(tmp_path):
    source = timm_test_file()
    (tmp_path / "test_models.py").write_bytes(source.read_bytes())
    env = {key: value for key, value in os.environ.items() if key != "GITHUB_ACTIONS"}  # timm's full set
    env["PYTHONPATH"] = str(HERE)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "timm_contract_plugin", "-p", "no:cacheprovider", "-W", "ignore",
         "-k", "continuum and not pretrained", "--deselect", f"test_models.py::{DESELECTED}", "test_models.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in summary and "failed" not in summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 25  # every continuum model went through the contract
