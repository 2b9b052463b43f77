"""``dfqvit train``: train a zoo model on a built-in dataset, resumably, and write its card."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..data import FASHION_MNIST
from ..errors import UserError
from ..evaluate import evaluate
from ..fileio import atomic_path, check_writable, write_text_atomic
from .args import add_data_args, add_model_args, eval_loader, spec_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on fashion-mnist or fashion-scenes (reproduces the zoo)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--shift", type=int, default=2, help="random translation augmentation, in pixels")
    p.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip")
    p.add_argument("--eval-every", type=int, default=0,
                   help="print the test top-1 every N epochs (monitoring only; the last epoch is kept)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run saved next to --out (OUT.train-state.pt, written every "
                        "epoch and every 10 minutes)")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors); the card goes next to it")
    p.set_defaults(func=cmd_train, batch_size=128)


def cmd_train(args) -> int:
    from safetensors.torch import save_file

    from ..train import TRAIN_DATASETS, TrainConfig, checkpoint_path, dump_json, train, zoo_card

    spec = spec_from_args(args)
    if spec.zoo and not args.checkpoint:
        spec.checkpoint = None  # retrain a zoo model from scratch
    for flag, ok, rule in (("--epochs", args.epochs >= 1, ">= 1"), ("--shift", args.shift >= 0, ">= 0"),
                           ("--eval-every", args.eval_every >= 0, ">= 0"),
                           ("--warmup-epochs", args.warmup_epochs >= 0, ">= 0"),
                           ("--label-smoothing", 0 <= args.label_smoothing < 1, "in [0, 1)"),
                           ("--hflip", 0 <= args.hflip <= 1, "in [0, 1]")):
        if not ok:
            raise UserError(f"{flag} must be {rule} (got {getattr(args, flag[2:].replace('-', '_'))})")
    args.data = args.data or FASHION_MNIST
    if args.data not in TRAIN_DATASETS:
        raise UserError(f"dfqvit train uses a built-in dataset: --data {' or '.join(TRAIN_DATASETS)} "
                        f"(got {args.data!r})")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      label_smoothing=args.label_smoothing, shift=args.shift, hflip=args.hflip,
                      amp=args.amp, seed=args.seed, eval_every=args.eval_every, dataset=args.data)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors (got {out})")
    check_writable(out)
    state_path = checkpoint_path(out)
    if state_path.exists() and not args.resume:
        raise UserError(f"{state_path} holds an unfinished run: add --resume to continue it, "
                        "or delete it to start over")
    model, data_config, seconds, history = train(spec, cfg, device=args.device, data_dir=args.data_dir,
                                                 state_path=state_path, resume=args.resume)
    result = evaluate(model, eval_loader(args, data_config), desc="test")
    command = "dfqvit " + shlex.join(sys.argv[1:])
    card = zoo_card(spec, data_config, cfg, model, result, seconds, args.device, command, out.name, history)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_text_atomic(out.with_suffix(".json"), dump_json(card))
    state_path.unlink(missing_ok=True)
    print(f"trained {spec.name} in {seconds:.0f}s: top1 {result.top1:.2f} top5 {result.top5:.2f} -> {out}")
    return 0
