"""What the subcommands print and write: result files (JSON / CSV, atomically), tables, the
evaluation line with timm's result keys."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import UserError
from ..fileio import check_writable, write_text_atomic


def write_results(path: str | None, fmt: str, rows: list[dict]) -> None:
    """Write result rows as JSON (one object, or a list) or CSV, atomically."""
    if not path:
        return
    if fmt == "json":
        text = json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + "\n"
    else:
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
                         for row in rows)
        text = buf.getvalue()
    write_text_atomic(path, text)


def check_results_file(path: str) -> None:
    if Path(path).is_dir():
        raise UserError(f"--results-file {path} is a directory; name a file")
    check_writable(path)


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def report_eval(args, name: str, result, param_count: int, data_config: dict, runtime: str | None = None) -> int:
    """Print an evaluation and write it with timm's result keys (+ images/s, agreement, KL)."""
    row = {
        "model": name, **({"runtime": runtime} if runtime else {}),
        "top1": round(result.top1, 3), "top1_err": round(100 - result.top1, 3),
        "top5": round(result.top5, 3), "top5_err": round(100 - result.top5, 3),
        "param_count": round(param_count / 1e6, 3), "img_size": data_config["input_size"][-1],
        "crop_pct": data_config.get("crop_pct"), "interpolation": data_config.get("interpolation"),
        "images_per_s": round(result.images_per_s, 1),
    }
    fidelity = ""
    if result.agreement is not None:
        row.update(agreement=round(result.agreement, 3), kl=round(result.kl, 6))
        fidelity = f"  agreement {result.agreement:.2f}%  KL {result.kl:.4f}"
    print(f"{name}{f' ({runtime})' if runtime else ''}: top1 {result.top1:.2f}  top5 {result.top5:.2f}  "
          f"{result.images_per_s:.0f} img/s  params {param_count / 1e6:.2f}M{fidelity}  ({result.images} images)")
    write_results(args.results_file, args.results_format, [row])
    return 0
