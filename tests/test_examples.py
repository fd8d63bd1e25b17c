"""Every script in examples/ runs on its tiny offline default, in its own interpreter, and does what it says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"{name}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_example_is_tested_and_documented():
    scripts = {p.name for p in EXAMPLES.glob("*.py")} - {"tiny_models.py"}
    tested = set(re.findall(r'run_example\("(\w+\.py)"', Path(__file__).read_text()))
    assert scripts == tested
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"python examples/{name}" in readme for name in scripts)


def test_digits_quickstart(tmp_path):
    from diffusers_attribution import FeatureStore

    out = run_example("digits_quickstart.py", tmp_path=tmp_path)
    assert len(re.findall(r"generated \d: top-5 training images \[", out)) == 4
    store = FeatureStore.from_pretrained(tmp_path / "outputs/digits_quickstart/store", verify=True)
    assert len(store) == 200 and store.config.method == "d-trak"
    assert (tmp_path / "outputs/digits_quickstart/attribution_grid.png").is_file()


def test_lora_audit(tmp_path):
    from diffusers_attribution import FeatureStore

    out = run_example("lora_audit.py", tmp_path=tmp_path)
    assert "LoRA fine-tune step 30/30" in out and len(re.findall(r"  \d\. training image \d+", out)) == 5
    store = FeatureStore.from_pretrained(tmp_path / "outputs/lora_audit/store")
    assert store.config.parameters == "lora" and store.config.adapter_name == "style"
    assert store.metadata["lora_adapters"] == ["style"]
    assert (tmp_path / "outputs/lora_audit/lora/pytorch_lora_weights.safetensors").is_file()


def test_hub_store_against_the_test_hub(tmp_path):
    with LocalHub() as hub:
        out = run_example("hub_store.py", "--repo-id", "tester/digits-features", "--endpoint", hub.endpoint,
                          "--token", "test", tmp_path=tmp_path)
        from huggingface_hub import HfApi

        files = HfApi(endpoint=hub.endpoint, token="test").list_repo_files("tester/digits-features",
                                                                           repo_type="dataset")
    assert "scores from the pulled store equal the local ones: True" in out
    assert {"config.json", "README.md", "attribution_grid.png", "kernel.safetensors"} <= set(files)


def test_accelerate_featurize_one_process(tmp_path):
    out = run_example("accelerate_featurize.py", "--out", str(tmp_path / "store"), tmp_path=tmp_path)
    assert "wrote FeatureStore(N=128, k=1024" in out
    assert len(json.loads((tmp_path / "store/config.json").read_text())["shards"]) == 4


def test_lds_tiny(tmp_path):
    out = run_example("lds_tiny.py", tmp_path=tmp_path)
    values = [float(v) for v in re.findall(r"LDS +[\w-]+: ([+-]\d\.\d+)", out)]
    assert len(values) == 2 and all(-1 <= v <= 1 for v in values)
    assert len(list((tmp_path / "outputs/lds_tiny/retrain").glob("subset-*.safetensors"))) == 4


def test_journey_trak(tmp_path):
    pytest.importorskip("matplotlib")
    out = run_example("journey_trak.py", tmp_path=tmp_path)
    assert len(re.findall(r"step +\d+ \(t= *\d+\): top training image \d+", out)) == 10
    assert (tmp_path / "outputs/journey_trak/journey.png").is_file()


def test_lds_lora(tmp_path):
    out = run_example("lds_lora.py", tmp_path=tmp_path)
    assert "retrain: subset-00003-seed-0 done" in out
    values = re.findall(r"LDS +([\w-]+) +(generated|real): ([+-]\d\.\d+)", out)
    assert [(method, name) for method, name, _ in values] == [
        ("ekfac", "generated"), ("ekfac", "real"), ("pixel-cosine", "generated"), ("pixel-cosine", "real")]
    assert all(-1 <= float(value) <= 1 for _, _, value in values)
    assert len(list((tmp_path / "outputs/lds_lora/retrain").glob("subset-*.safetensors"))) == 4
