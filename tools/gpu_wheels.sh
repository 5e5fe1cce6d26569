#!/bin/sh
# The wheels tools/gpu_check.py needs on an offline GPU machine with Python 3.12, torch 2.11,
# transformers, tokenizers, safetensors, imageio, but no tyro or diffusers, downloaded into .whl/
# (git ignores it; 6.4 MB): tyro and its two pure-Python needs, diffusers, importlib_metadata
# (diffusers imports it).
# The versions are this repository's tested ones. Run from the repository root:
#     sh tools/gpu_wheels.sh
# then copy the repository with .whl/ there and install them (docs/benchmarks.md, "GPU check").
set -e
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 diffusers==0.42.1 importlib_metadata==8.7.0
du -sh .whl
