"""The whole recipe at tiny scale (examples/run_recipe.sh), run once as a user runs it, and
tools/plot_metrics.py on its runs."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from distributed import ROOT, logged_losses

STAGES = ["decontaminate", "preprocess", "pretrain", "midtrain", "sft", "pts", "dpo1", "dpo2",
          "export"]
TRAINING = ["pretrain", "midtrain", "sft", "dpo1", "dpo2"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    env = {**os.environ, "RECIPE_DIR": str(out)}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "run_recipe.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def test_every_stage_runs_and_starts_from_the_one_before(recipe):
    out, stdout = recipe
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == STAGES
    for stage in STAGES:  # the closing table has a row per stage
        assert f"\n{stage} " in stdout, stdout
    previous = None
    for stage in TRAINING:
        cfg = yaml.safe_load((out / stage / "config.yaml").read_text())
        assert cfg["checkpoint"]["load"] == (str(out / previous) if previous else None), stage
        assert (out / stage / "checkpoints" / "latest").is_file()
        previous = stage
    pre, mid = (yaml.safe_load((out / s / "config.yaml").read_text())["model"]
                for s in ("pretrain", "midtrain"))
    assert (pre["rotary_base"], pre["seq_length"]) == (10000.0, 128)
    assert (mid["rotary_base"], mid["seq_length"]) == (250000.0, 256)
    # each stage learns: the training losses fall, and DPO starts at ln 2 (policy = reference)
    for stage in ("pretrain", "sft", "dpo1", "dpo2"):
        losses = logged_losses(out / stage)
        assert losses[-1] < losses[0], (stage, losses)
    for stage in ("dpo1", "dpo2"):
        assert abs(logged_losses(out / stage)[0] - math.log(2)) < 1e-6


def test_decontamination_removes_the_planted_documents(recipe):
    out, _ = recipe
    contaminated = {}
    for source in ("web", "web_rewrites", "synthetic", "code", "acquired"):
        for line in (out / "decon" / source / "contaminated.jsonl").read_text().splitlines():
            record = json.loads(line)
            contaminated[record["id"]] = record["decontamination"]["item"]
    assert contaminated == {  # examples/data/benchmarks/README.md
        "jargon-chapter-2-of-slang-jargon-and-techspeak": "reading-1",
        "austen-persuasion-ch001-005": "reading-2",
        "pydoc-faq-gui-006-i-can-t-get-key-bindings-to-work-in-tkinter-why": "tk-1"}
    clean = sum(len((out / "decon" / s / "clean.jsonl").read_text().splitlines())
                for s in ("web", "web_rewrites", "synthetic", "code", "acquired"))
    meta = sum(json.loads((out / "data" / f"{s}.meta.json").read_text())["documents"]
               for s in ("web", "web_rewrites", "synthetic", "code", "acquired"))
    assert clean == meta == 352  # what was preprocessed is what decontamination kept


def test_pts_pairs_train_dpo_round_1(recipe):
    out, _ = recipe
    pairs = [json.loads(x) for x in (out / "pts" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 3
    assert all(p["chosen_token_id"] != p["rejected_token_id"] for p in pairs)
    meta = json.loads((out / "data" / "pts_pairs.meta.json").read_text())
    assert meta["documents"] == len(pairs)


def test_the_export_loads_in_transformers_with_megaphis_logits(recipe):
    out, stdout = recipe
    check = json.loads((out / "hf_check.json").read_text())
    assert check["max_abs_logit_diff"] <= 1e-5 and check["logit_scale"] > 1.0, check
    assert check["generated"] and "transformers generate, greedy" in stdout
    config = json.loads((out / "hf" / "config.json").read_text())
    vocab = json.loads((out / "tok" / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert config["vocab_size"] == 128 and config["rope_theta"] == 250000.0
    # the character-level tokenizer's special ids, not Phi-4's
    assert config["eos_token_id"] == ids["<|im_end|>"]
    assert config["bos_token_id"] == ids["<|endoftext|>"]


def test_plot_metrics_draws_the_runs_and_refuses_a_directory_without_metrics(recipe, tmp_path):
    out, _ = recipe
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tool = [sys.executable, str(ROOT / "tools" / "plot_metrics.py")]
    png = tmp_path / "sft.png"
    proc = subprocess.run([*tool, str(out / "sft"), str(out / "dpo1"), "--output", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "sft" in proc.stdout and "dpo1" in proc.stdout  # the table
    bad = subprocess.run([*tool, str(tmp_path), "--output", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"plot_metrics: error: {tmp_path}: no metrics.jsonl (a megaphi run directory has one "
        "once a training run has logged a step)"]
    assert not (tmp_path / "x.png").exists()
