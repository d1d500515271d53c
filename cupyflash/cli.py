"""The ``cupyflash`` command: ``demo`` (the main job), ``doctor`` (what is installed, do kernels compile) and
``bench`` (attention TFLOP/s and memory against torch's).

Errors a user can fix (``CupyflashError``, and a file the system refuses to read or write) print one sentence and
exit with code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__, bench, log
from .errors import CupyflashError, require_torch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cupyflash", description="FlashAttention kernels through CuPy, and a "
                                     "torch.compile backend that fuses naive attention.")
    parser.add_argument("--version", action="version", version=f"cupyflash {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (same as CUPYFLASH_LOG=debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fuse the naive attention of a small GPT, check it against eager, time it")
    demo.add_argument("--cpu", action="store_true", help="run the small CPU version even when a GPU is present")
    demo.add_argument("--steps", type=bench.positive_int, default=20,
                      help="timed training steps per variant (GPU; default 20)")
    demo.add_argument("--plot", metavar="PATH", help="also write the timings as a PNG (needs matplotlib)")

    doctor = sub.add_parser("doctor", help="versions, kernel cache, and a compile of every kernel variant")
    doctor.add_argument("--arch", action="append", metavar="sm_XX",
                        help="compile for this arch (repeatable; default: this GPU, or sm_80 and sm_90)")
    doctor.add_argument("--only", metavar="TEXT", help="only the kernel variants whose name contains TEXT")

    bench.add_arguments(sub.add_parser("bench", help="TFLOP/s and peak memory against N, vs torch SDPA (GPU)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verbose:
        log.setup("debug")
    try:
        if args.command == "demo":
            require_torch("cupyflash demo")
            from . import demo

            return demo.run(force_cpu=args.cpu, steps=args.steps, plot_path=args.plot)
        if args.command == "bench":
            require_torch("cupyflash bench")
            return bench.run(args)
        from . import doctor

        return doctor.run(arches=args.arch, only=args.only)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        log.logger.debug("user error", exc_info=True)
        print(f"cupyflash: {message}", file=sys.stderr)
        return 2


def _user_error(err: BaseException) -> str | None:
    """The one-sentence message of the user error behind ``err``, if any: a CupyflashError, or an OSError naming a
    file (a path given that is not writable, a directory that is missing). torch.compile wraps errors raised while
    compiling (BackendCompilerFailed keeps the original as ``inner_exception``), Python chains others as causes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CupyflashError):
            return str(err)
        if isinstance(err, OSError) and err.filename is not None and err.strerror:
            return f"{err.filename}: {err.strerror}."
        seen.add(id(err))
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None
