"""Build the compiled hashing core (phash_trio.image.hashcore); the metadata is in pyproject.toml.

Exactness needs plain IEEE f32 arithmetic: no FMA contraction (-ffp-contract=off), never
-ffast-math; signed overflow wraps as in the Rust reference's release build (-fwrapv).
Needs a C compiler, Python's headers and libjpeg-turbo's headers (Debian: build-essential,
python3-dev, libjpeg62-turbo-dev; ./dev installs them).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "phash_trio.image.hashcore",
            sources=["phash_trio/image/hashcore.c", "phash_trio/image/pdqcore.c"],
            depends=["phash_trio/image/pdqcore.h"],
            libraries=["jpeg", "m"],
            extra_compile_args=[
                "-O3",
                "-std=c11",
                "-ffp-contract=off",
                "-fno-fast-math",
                "-fwrapv",
                "-fno-strict-aliasing",
                "-fno-tree-loop-distribute-patterns",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
                "-Wno-clobbered",
                "-Wno-psabi",
            ],
        )
    ]
)
