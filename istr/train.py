"""Train and evaluate ISTR: ``python -m istr.train --scale smoke --output-dir DIR [key=value ...]``.

The config is built as: paper defaults <- ``--scale`` preset <- ``--config`` file <- ``key=value``
overrides (dotted keys of istr/config.py, values in YAML syntax). Rerunning the same command resumes
from ``DIR/checkpoints/last.pth``; a finished run prints its metrics and exits. Under torchrun (or srun
with several tasks) every process runs this same command and the global batch is split over them.

Examples::

    python -m istr.train --scale smoke --output-dir runs/smoke
    python -m istr.train --scale smoke --output-dir runs/mine data.dataset=/data/my_coco_dir
    python -m istr.train --scale smoke --output-dir runs/smoke --profile 10
    torchrun --nproc_per_node 2 -m istr.train --scale tiny --output-dir runs/ddp

Ctrl-C or SIGTERM stops the run after saving a checkpoint at the last completed iteration; the same command
resumes from there.

Exit status: 0 done, 1 training diverged (NaN/inf loss; the last good checkpoint is kept),
2 bad input (config key or value, dataset, checkpoint), 130 stopped by Ctrl-C, 143 stopped by SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Optional

from istr.config import PRESETS, Config, ConfigError, apply_overrides, build_config, load
from istr.dataclass_tree import flatten

EXIT_DIVERGED, EXIT_BAD_INPUT = 1, 2


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the training loop, which saves where it stopped


def resolve_config(scale: Optional[str], config_file: Optional[str], overrides: list[str]) -> Config:
    """Defaults <- preset <- config file (only the keys it sets) <- overrides."""
    cfg = build_config(scale)
    if config_file:
        import yaml

        if not Path(config_file).is_file():
            raise ConfigError(f"--config {config_file}: no such file")
        load(config_file)  # validates keys and values, with file-named messages
        cfg = apply_overrides(cfg, flatten(yaml.safe_load(Path(config_file).read_text()) or {}))
    return apply_overrides(cfg, overrides)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m istr.train", description=__doc__.split("\n\n")[0],
                                epilog="key=value overrides use the dotted names of istr/config.py, e.g. "
                                       "model.mask.components=40 solver.max_iter=200 data.dataset=/path/to/coco_dir",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(PRESETS), help="preset on top of the paper defaults (tiny, smoke, paper)")
    p.add_argument("--config", metavar="FILE", help="YAML/JSON config file (a partial nested dict), applied after --scale")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="run directory: checkpoints, logs, metrics")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print a per-iteration time breakdown over N training iterations and exit (writes no checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from istr.data.validate import DatasetError
    from istr.engine import distributed
    from istr.engine.checkpoint import CheckpointError
    from istr.engine.job import train_and_evaluate
    from istr.engine.train import NonFiniteLossError

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if args.profile < 0:
            raise ConfigError(f"--profile: expected a positive number of iterations, got {args.profile}")
        cfg = resolve_config(args.scale, args.config, args.overrides)
        metrics = train_and_evaluate(cfg, args.output_dir, profile_iters=args.profile)
    except (ConfigError, DatasetError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (KeyboardInterrupt, SystemExit) as err:
        print("stopped; the same command resumes the run", file=sys.stderr)
        if isinstance(err, SystemExit):
            raise
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.cleanup()
    if metrics and distributed.env_info().is_main:
        print(json.dumps(metrics["final"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
