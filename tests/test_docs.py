"""The documentation site (mkdocs.yml, docs/) builds with `mkdocs build --strict`: no warning,
every reference page rendered from the docstrings, the notebooks rendered with their outputs."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "-f", os.path.join(ROOT, "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    read = lambda *parts: (site.joinpath(*parts, "index.html")).read_text(encoding="utf-8")
    assert 'id="jaxkv.policies.registry.make_policy"' in read("reference", "policies")
    assert 'id="jaxkv.eval.config.EvalConfig"' in read("reference", "eval")
    assert 'id="pallas_kernels.dispatch.kernel_mode"' in read("reference", "kernels")
    for page in ("architecture", "methods"):
        assert read(page)
    for name in ("quickstart", "grkv", "rdkv", "evaluate"):
        assert "data:image/png;base64" in read("colab", name), name  # outputs shown, not rerun
    assert not os.path.exists(os.path.join(ROOT, ".cache", "mkdocs-jupyter"))
