"""How `harp export` and `harp verify` print an artifact: its file table and parity lines (torch-free)."""

from pathlib import Path

import click


def human_size(n: float) -> str:
    """1000-based size: 512 B, 62.4 kB, 59.9 MB."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def echo_files(files: dict, out) -> None:
    """The file table: name, size, first 12 hex digits of the SHA-256 (manifest.json last, unhashed)."""
    rows = [(name, entry["bytes"], entry["sha256"][:12]) for name, entry in files.items()]
    manifest = Path(out) / "manifest.json"
    if manifest.is_file():
        rows.append(("manifest.json", manifest.stat().st_size, ""))
    click.echo(f"  {'file':<20} {'size':>10}  sha256")
    for name, size, digest in rows:
        click.echo(f"  {name:<20} {human_size(size):>10}  {digest}")


def echo_parity(results: dict) -> None:
    """One line per format: max |diff|, tolerance, argmax agreement, executor, verdict."""
    for fmt, r in results.items():
        click.echo(f"  {fmt:<12} max |diff| {r['max_abs_diff']:.2e}  tolerance {r['tolerance']:.1e}  "
                   f"argmax {r['argmax_agree']}/{r['n_inputs']}  [{r['executor']}]  "
                   f"{'ok' if r['passed'] else 'FAILED'}")
