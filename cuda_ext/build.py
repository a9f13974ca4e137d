"""``python -m cuda_ext.build``: compile the native kernels now and report the status.

Exit status 0 when the kernels are built or there is no CUDA (the reference serves),
1 when CUDA is present and the build failed (the message says why).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quiet", action="store_true", help="do not echo the compiler's commands")
    args = ap.parse_args(argv)
    from cuda_ext import native

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        from torch.utils import cpp_extension

        print(f"CUDA_HOME {cpp_extension.CUDA_HOME}, ninja: {cpp_extension.is_ninja_available()}")
        native.build(verbose=not args.quiet)
    status = native.status()
    print(f"cuda_ext: {status}")
    return 1 if status.startswith("build failed") else 0


if __name__ == "__main__":
    sys.exit(main())
