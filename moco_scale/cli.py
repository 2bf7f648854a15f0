"""The `moco-scale` command: one subcommand per driver."""

from __future__ import annotations

import sys

COMMANDS = {
    "pretrain": ("moco_scale.pretrain", "MoCo v3 pretraining"),
    "lincls": ("moco_scale.lincls", "linear evaluation on frozen features (MoCo v3's protocol)"),
    "probe": ("moco_scale.probe", "kNN and linear probe of frozen features (pretrained vs random init)"),
    "hostfile": ("moco_scale.hostfile", "check a DeepSpeed hostfile (hosts, slots, master) before launching"),
    "report": ("moco_scale.report", "PNG plots and a Markdown summary of a pretraining run"),
    "plan": ("moco_scale.plan", "per-GPU memory and communication of a setup, before paying for it"),
    "convert": ("moco_scale.convert", "a checkpoint to the reference layout, DeiT, timm or torchvision"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:10s} {doc}" for name, (_, doc) in COMMANDS.items())
        print(f"usage: moco-scale COMMAND [ARGS]\n\ncommands:\n{lines}", file=sys.stderr if argv else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
