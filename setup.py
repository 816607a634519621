"""herd: the Llama herd, the DeiT III line and clustering-based data curation in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="herd",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["herd", "herd.*", "configs", "configs.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "tiktoken>=0.9",
        "ml-collections>=1.0",
        "absl-py",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # herd.vision: PIL decodes and augments images on the host; scikit-learn ships the
        # handwritten digits, the embedded default of python -m herd.vision.train
        "pillow>=10",
        "scikit-learn>=1.4",
    ],
    extras_require={
        # nbclient / nbformat / ipykernel: tests/test_notebooks.py runs notebooks/*.ipynb.
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "array_record>=0.5",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
        ],
        # Live parity tests and benchmarks against the peers. torch is pinned: that
        # version is a CPU build on the project's machines; an unpinned torch pulls a
        # multi-GB CUDA build.
        "peers": [
            "torch==2.13.0",
            "transformers==5.24.0",
            "safetensors",
            "faiss-cpu==1.15.1",
            "scikit-learn==1.9.1",
        ],
        "tfds": ["tensorflow-datasets>=4.9"],
    },
)
