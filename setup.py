"""ipu-t5: Flan-T5 fine-tuning split over accelerators; see README.md."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).resolve().parent

setup(
    name="ipu-t5",
    version="0.1.0",
    description="Fine-tune Flan-T5 XL/XXL as a pipeline with data parallelism on IPUs, GPUs or CPUs",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["ipu_t5", "ipu_t5.*"]),
    package_data={"ipu_t5": ["tasks/metrics/*/*.py"]},
    data_files=[("share/ipu-t5/configs", [str(p.relative_to(here)) for p in sorted((here / "configs").glob("*.yaml"))])],
    # Ranges that admit both stacks: the Poplar SDK's (Python 3.8, torch 2.0.1, transformers
    # 4.46.3) and today's (Python 3.11+, torch 2.13, transformers 5.x).
    install_requires=[
        "torch>=2.0.1",
        "transformers>=4.46.3",
        "tokenizers>=0.20",
        "datasets>=2.14",
        "evaluate>=0.4",
        "sentencepiece>=0.1.99",
        "protobuf>=3.20",
        "safetensors>=0.4",
        "pyyaml>=5.4",
        "tqdm>=4.64",
        "tensorboard>=2.10",
        "numpy",
        # LoRA; 0.13 is the newest that the Poplar SDK's stack (torch 2.0.1) was tested with.
        "peft>=0.13",
        # Whether the export's reload check fits in memory.
        "psutil>=5.9",
        # The summarization task's ROUGE.
        "rouge_score>=0.1.2",
    ],
    extras_require={
        # Running notebooks/flan-t5-mnli.ipynb and drawing its figures.
        "notebook": ["matplotlib>=3.6", "ipykernel>=6", "papermill>=2.4"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "vermin>=1.6", "psutil>=5.9",
                 "matplotlib>=3.6", "ipykernel>=6", "papermill>=2.4",
                 # model.quantization's tests (LoRA on an nf4/int8 base; 0.45 brought its CPU backend).
                 # Not on the Poplar SDK's Python 3.8 stack, whose torch 2.0.1 it does not run on.
                 "bitsandbytes>=0.45; python_version >= '3.9'"],
    },
    entry_points={"console_scripts": ["ipu-t5=ipu_t5.cli:main"]},
)
