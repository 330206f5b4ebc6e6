"""The library is an optimizer first: ``pip install commlmo`` without ``[train]`` or ``[testing]``.

``import commlmo`` and ``build_optimizer`` work with tqdm, matplotlib, mnist1d,
hypothesis and tokenizers all unimportable (set to ``None`` in ``sys.modules``
before commlmo is imported, as if not installed), and ``commlmo train`` then
says in one line which extra to install.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # python < 3.11
    import tomli as tomllib

import yaml

EXTRAS_ONLY = ("tqdm", "matplotlib", "mnist1d", "hypothesis", "tokenizers")
BLOCK = f"import sys\nfor m in {EXTRAS_ONLY!r}:\n    sys.modules[m] = None\n"
ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_import_and_build_optimizer_need_none_of_the_extras(tmp_path):
    proc = _python("""
        import torch
        import commlmo
        from commlmo import build_optimizer
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        opt = build_optimizer(model, "signmuon")
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        import commlmo.cli, commlmo.train  # the harness's modules import too; only running it needs the extra
        print("ok", [m for m in ("tqdm", "matplotlib", "mnist1d", "hypothesis", "tokenizers") if sys.modules[m]])
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok []"


def test_train_without_the_extra_says_which_one_to_install_in_one_line(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"optimizer": "muon", "task": {"kind": "mnist1d"}}))
    proc = _python(f"""
        from commlmo.cli import main
        sys.exit(main(["train", {str(cfg)!r}, "--out", {str(tmp_path / 'run')!r}]))
    """, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["commlmo train: error: the training harness needs its extra: pip install 'commlmo[train]' "
                     "(missing: tqdm, matplotlib, mnist1d)"], proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_package_metadata_splits_the_optimizer_from_the_harness():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for d in meta["dependencies"]}
    assert names == {"torch", "numpy", "pydantic", "pyyaml", "tomli"}
    extras = meta["optional-dependencies"]
    assert {"train", "testing", "test", "docs"} <= set(extras)
    assert {d.split(">")[0] for d in extras["train"]} == {"tqdm", "matplotlib", "mnist1d", "tokenizers"}
    assert any(d.startswith("tokenizers>=0.15") for d in extras["train"])
    assert [d.split(">")[0] for d in extras["testing"]] == ["hypothesis"]
    assert '".[train,testing,test,docs,integrations]"' in (ROOT / "scripts" / "setup.sh").read_text()
