"""samclip_jax: SAM-CLIP (arXiv 2310.15308) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="samclip_jax",
    version="0.1.0",
    description="SAM-CLIP: merge CLIP into SAM by multi-task distillation, in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["samclip_jax", "samclip_jax.*", "convert", "configs", "configs.*"]),
    # The CLIP BPE vocabulary and the embedded world's pretrained teachers (model directories).
    package_data={"samclip_jax": ["assets/*", "assets/teachers/**/*"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "array_record==0.8.6",
        "tensorflow-datasets==4.9.10",
        "transformers==5.23.0",
        "ml_collections==1.1.0",
        "absl-py",
        "numpy",
        "pillow",
        "pycocotools==2.0.11",
        "safetensors==0.8.0",
        "tensorboardX",
        "ftfy==6.3.1",  # text cleaning exactly as open_clip does it, before BPE
        "regex",
        "msgpack",
        "scipy",
    ],
    extras_require={
        # References for parity tests and the converters' readers; never imported by the library.
        "test": [
            "torch==2.13.0",  # with PyPI's torchvision 0.28.0: see README, Install
            "torchvision==0.28.0",
            "segment-anything==1.0",
            "open_clip_torch==3.3.0",
            "onnx==1.23.1", "onnxruntime==1.30.0",  # convert.to_torch --onnx and its test (wheels in the local cache)
            "pytest",
            "pytest-xdist",
        ],
    },
)
