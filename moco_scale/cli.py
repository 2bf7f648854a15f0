"""The `moco-scale` command: one subcommand per module in moco_scale/commands/.

    moco-scale pretrain ...                      (also: python -m moco_scale pretrain ...)
    torchrun --nproc_per_node 8 -m moco_scale pretrain ...
    deepspeed --num_gpus 8 --module moco_scale pretrain ...
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from moco_scale.signals import Interrupted, interrupt_on_signals

COMMANDS = {
    "pretrain": "MoCo v3 pretraining",
    "finetune": "end-to-end fine-tuning and transfer learning (DeiT, MAE and the seed's transfer recipes)",
    "lincls": "linear evaluation on frozen features (MoCo v3's protocol)",
    "knn": "distributed weighted kNN accuracy of frozen features",
    "probe": "kNN and linear probe of frozen features (pretrained vs random init)",
    "hostfile": "check a DeepSpeed hostfile (hosts, slots, master) before launching",
    "report": "PNG plots and a Markdown summary of a run",
    "plan": "per-GPU memory and communication of a setup, before paying for it",
    "convert": "a checkpoint to the reference layout, DeiT, timm or torchvision",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the deepspeed launcher puts --local_rank=N in front of the arguments: it belongs to the command
    launcher = [a for a in argv[:1] if a.startswith(("--local_rank=", "--local-rank="))]
    argv = argv[len(launcher):]
    if launcher and argv:
        argv = [argv[0], *launcher, *argv[1:]]
    known = [c for c in COMMANDS if importlib.util.find_spec(f"moco_scale.commands.{c}") is not None]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in known:
        lines = "\n".join(f"  {name:10s} {COMMANDS[name]}" for name in known)
        print(f"usage: moco-scale COMMAND [ARGS]\n\ncommands:\n{lines}", file=sys.stderr if argv else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    with interrupt_on_signals():
        try:
            return importlib.import_module(f"moco_scale.commands.{argv[0]}").main(argv[1:])
        except Interrupted as e:
            print(f"moco-scale {argv[0]}: {e.message()}", file=sys.stderr)
            return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
