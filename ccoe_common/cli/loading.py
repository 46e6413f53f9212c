"""Loading a model for a CLI command from its --backbone/--expert/--device/--dtype flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from ccoe_common.console import UserError
from ccoe_common.defaults import DTYPE_CHOICES
from ccoe_common.model import CCoEModel
from ccoe_common.settings import load_settings


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="torch device (default: CCOE_DEVICE, else cuda if present, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_CHOICES), default="auto",
                        help="weights dtype (auto: float32 on CPU, bfloat16 on CUDA)")


def model_from_args(args: argparse.Namespace, *, budget_fraction: float | None = None) -> CCoEModel:
    backbone = Path(args.backbone)
    if not (backbone / "config.json").exists():
        raise UserError(f"--backbone {backbone} is not a checkpoint directory (no config.json)")
    device = args.device or load_settings().device
    kwargs = {} if budget_fraction is None else {"budget_fraction": budget_fraction}
    return CCoEModel.from_pretrained(backbone, dtype=DTYPE_CHOICES[args.dtype], device=device, **kwargs)
