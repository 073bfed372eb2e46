"""The ``rbe`` command line. Every command exits non-zero with a one-line message on bad input."""

from __future__ import annotations

import json
import sys

import click

import rbe_core

from .errors import RBEError
from .hookspecs import KINDS


def _fail(exc: Exception) -> None:
    click.echo(f"rbe: error: {exc}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(rbe_core.__version__, prog_name="rbe")
def main() -> None:
    """Compress neural-network weights into block codes and run them."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List codecs, geometries, backends, derivative engines and quantizers, with their distributions."""
    reg = rbe_core.registry()
    backends = {b["name"]: b for b in rbe_core.list_backends()}
    out: dict = {}
    for kind in KINDS:
        rows = []
        for key, entry in sorted(reg.entries[kind].items()):
            row = {"name": key, "plugin": entry.plugin, "dist": entry.dist, "available": True, "reason": ""}
            if kind == "backends":
                row.update({k: backends[key][k] for k in ("available", "reason", "features", "kernels", "priority")})
            rows.append(row)
        out[kind] = rows
    out["failed"] = [vars_of(p) for p in reg.failures]
    out["disabled"] = [vars_of(p) for p in reg.disabled]
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for kind in KINDS:
        click.echo(f"{kind}:")
        for row in out[kind] or [{"name": "(none)", "dist": "", "available": True, "reason": ""}]:
            state = "" if row["available"] else f"  [unavailable: {row['reason']}]"
            feats = f"  features: {', '.join(row['features'])}" if row.get("features") else ""
            click.echo(f"  {row['name']:<16} {row['dist']}{state}{feats}")
    for label in ("failed", "disabled"):
        for p in out[label]:
            click.echo(f"{label}: {p['plugin']} ({p['dist']}): {p['error']}")


def vars_of(problem) -> dict:
    return {"plugin": problem.plugin, "dist": problem.dist, "error": problem.error}


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, as_json: bool) -> None:
    """Describe the tensors of an .rbe file and verify their checksums."""
    try:
        f = rbe_core.open(path)
    except (RBEError, OSError) as exc:
        _fail(exc)
    rows = []
    for name, h in f.headers.items():
        status = f.status(name)
        row = {"name": name, "codec": h["codec"], "plugin": h["plugin"], "shape": h["shape"], "dtype": h["dtype"],
               "source": h["source"], "status": status}
        if status == "ok":
            enc = f[name]
            row.update(bytes=enc.nbytes, bits_per_weight=enc.bits_per_weight)
        rows.append(row)
    ok = all(r["status"] == "ok" for r in rows)
    total_bytes = sum(r.get("bytes", 0) for r in rows)
    if as_json:
        click.echo(json.dumps({"path": path, "format": rbe_core.FORMAT_VERSION, "tensors": rows,
                               "total_bytes": total_bytes, "metadata_keys": sorted(f.metadata), "ok": ok}, indent=2))
    else:
        click.echo(f"{path}: {len(rows)} tensors, {total_bytes / 1e6:.3f} MB stored")
        for r in rows:
            bpw = f"{r['bits_per_weight']:7.3f} bpw" if "bits_per_weight" in r else "      ? bpw"
            click.echo(f"  {r['name']:<48} {r['codec']['id']:<10} {str(r['shape']):<16} {bpw}  {r['status']}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
