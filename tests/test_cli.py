"""megaphi-train as a user runs it."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "megaphi.train", *args],
                          capture_output=True, text=True, timeout=300)


def test_phi4_dry_run_prints_config_and_exact_count():
    proc = run("--preset", "phi4-14b", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 14,659,507,200 total, 13,631,902,720 non-embedding" in proc.stdout
    assert "num_kv_heads: 10" in proc.stdout and "rotary_base: 10000.0" in proc.stdout


def test_yaml_config_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmodel:\n  num_layers: 2\n")
    proc = run("--config", str(path), "model.hidden_size=64", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "num_layers: 2" in proc.stdout and "hidden_size: 64" in proc.stdout
    # 2 layers of width 64 (8 heads of 8, 2 KV heads, FFN 384) plus untied 100,352-row embeddings
    layer = 64 * (8 + 2 * 2) * 8 + 64 * 64 + 3 * 64 * 384 + 2 * 64
    assert f"parameters: {2 * layer + 64 + 2 * 100352 * 64:,} total" in proc.stdout


def test_bad_override_is_one_clear_error():
    proc = run("--preset", "phi4-14b", "parallel.tp=4", "--dry-run")
    assert proc.returncode == 2
    assert "parallel.tp" in proc.stderr and "[1, 2, 5, 10]" in proc.stderr
    assert "Traceback" not in proc.stderr
