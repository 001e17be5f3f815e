"""`kdgen` command line: generate, score, ls, info, verify, merge, push, pull, upgrade.

The typer app is the one registry of commands. `generate` and `score` are generated from
`kdgen.config.GenerateConfig` by `kdcore.cli` (one flag per field, `--config FILE`, trailing
key=value overrides); every command calls a plain function; user errors (`KdError`) print one line
and exit 2, with no traceback. Test: `pytest tests/test_kdgen_errors.py tests/test_cli.py`.
"""

from __future__ import annotations

import json
import sys

import typer

from kdcore.cli import config_command, make_app
from kdcore.errors import run_cli
from kdgen.config import GenerateConfig

app = make_app("kdgen", "Write teacher datasets: completions plus top-k log-probs, as sharded Parquet.")
def _generate(kind: str):
    def go(cfg: GenerateConfig) -> str:
        from kdgen.generate import run

        return run(cfg, kind)

    return go


# flags of `generate` only (sampling and slicing) and of `score` only (the given completions);
# --seed serves both: it also seeds the --sampled-targets draws
SAMPLING = ("temperature", "top_p", "top_k", "max_new_tokens", "n", "shard_index", "num_shards")
SCALE_OUT = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "ray", "replicas")  # generate only, for now
SCORING = ("completion_column", "append_eos")
app.command("generate")(
    config_command(GenerateConfig, _generate("generate"), "Generate completions and top-k log-probs with the teacher; print the dataset URL.", exclude=SCORING)
)
app.command("score")(
    config_command(
        GenerateConfig, _generate("score"), "Teacher-forced top-k log-probs for given prompt + completion pairs (same row schema).",
        exclude=SAMPLING + SCALE_OUT, helps={"prompts": "File with prompts and completions to score (teacher-forced), or a teacher dataset directory (its completion_ids are scored as they are: a student's samples)."},
    )
)


@app.command("ls")
def ls(root: str = typer.Argument(..., help="Directory or URL holding teacher datasets."), as_json: bool = typer.Option(False, "--json")):
    """List the complete datasets under ROOT."""
    from rich.table import Table

    from kdcore.dataset import list_datasets
    from kdcore.progress import console

    found = list_datasets(root)
    if as_json:
        print(json.dumps([_brief(m) for m in found], indent=2))
        return
    if not found:
        console.print(f"no teacher datasets under {root}")
        return
    table = Table("fingerprint", "teacher", "prompts", "rows", "tokens", "k", "size", "created", "by")
    for m in found:
        b = _brief(m)
        table.add_row(b["fingerprint"], b["teacher"], b["prompts"], f"{b['rows']:,}", f"{b['tokens']:,}", str(b["k"]), _size(b["bytes"]), b["created"], b["created_by"])
    from rich.console import Console

    # full cells when piped (rich would squeeze the table to 80 columns)
    Console(width=None if sys.stdout.isatty() else 220).print(table)


def _brief(m: dict) -> dict:
    return {
        "fingerprint": m["fingerprint"],
        "teacher": m["teacher"]["source"],
        "prompts": m["prompts"]["source"],
        "rows": m["totals"]["rows"],
        "tokens": m["totals"]["tokens"],
        "bytes": m["totals"]["bytes"],
        "bytes_per_token": m["totals"]["bytes_per_token"],
        "k": m["generation"]["k"],
        "kind": m["generation"]["kind"],
        "created": m.get("created", "?"),
        "created_by": m.get("created_by", "?"),
    }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def info(dataset: str = typer.Argument(..., help="Dataset directory or URL (ROOT/<fingerprint>)."), as_json: bool = typer.Option(False, "--json")):
    """Teacher, prompts, rows, tokens, bytes/token, k and fingerprint of a dataset."""
    from kdcore.dataset import TeacherDataset, sampled_targets

    m = TeacherDataset(dataset).manifest
    if as_json:
        print(json.dumps(m, indent=2))
        return
    b, g = _brief(m), m["generation"]
    lines = [
        ("fingerprint", b["fingerprint"]),
        ("teacher", f"{b['teacher']} ({m['teacher']['dtype']}, weights {m['teacher']['weights_hash'][:12]})"),
        ("prompts", f"{b['prompts']} ({m['prompts']['count']:,} prompts)"),
        ("rows", f"{b['rows']:,}"),
        ("tokens", f"{b['tokens']:,}"),
        ("bytes/token", f"{b['bytes_per_token']}  ({_size(b['bytes'])} in {len(m['shards'])} shard(s))"),
        ("k", str(g["k"]) + (f"  (+ sampled targets: N={sampled_targets(m)} draws per token)" if sampled_targets(m) else "")),
        ("format", f"v{m['format_version']}" + (" (read-only: `kdgen upgrade` rewrites it as v2)" if m["format_version"] == 1 else "")),
        ("generation", f"{g['kind']} via {g['backend']} ({g['engine_version']}), T={g['temperature']} top_p={g['top_p']} max_new={g['max_new_tokens']} n={g['n']} seed={g['seed']}"),
        ("throughput", f"{m.get('tokens_per_s') or '-'} tokens/s, wall {m.get('wall_time_s')} s"),
        ("created", b["created"]),
    ]
    width = max(len(a) for a, _ in lines)
    for a, v in lines:
        print(f"{a:<{width}}  {v}")


@app.command()
def verify(dataset: str = typer.Argument(..., help="Dataset directory or URL."), quick: bool = typer.Option(False, help="Checksums only; skip the row invariants.")):
    """Check checksums and the format's invariants; exit 1 naming each problem."""
    from kdcore.progress import console
    from kdcore.verify import verify as run_verify

    manifest, problems = run_verify(dataset, deep=not quick)
    if problems:
        for p in problems:
            console.print(f"[red]FAIL[/] {p}")
        raise typer.Exit(1)
    console.print(f"[green]OK[/] {dataset}: {len(manifest['shards'])} shard(s), {manifest['totals']['rows']:,} rows, checksums and invariants hold")


@app.command()
def merge(
    dataset: str = typer.Argument(..., help="OUT/<fingerprint> of a sliced run (--num-shards > 1)."),
    sources: list[str] = typer.Argument(None, help="Other machines' copies of the same OUT/<fingerprint>, to copy shards from."),
):
    """Commit a dataset written by several machines: gather shards, check them, write the manifest."""
    from kdcore.progress import console
    from kdgen.commit import merge as run_merge
    from kdgen.commit import summary

    m = run_merge(dataset, sources or [])
    console.print(f"[green]merged:[/] {summary(m)} -> {dataset}")


def _copy(src: str, dest: str) -> None:
    from kdcore.progress import console
    from kdgen.store import copy_dataset

    def say(rel: str, what: str) -> None:
        console.print(f"  {rel}: {'already there, checksum ok' if what == 'present' else 'copied, checksum ok'}")

    r = copy_dataset(src, dest, on_shard=say)
    if r.already_complete:
        console.print(f"[green]up to date:[/] {r.url} already holds this dataset")
    else:
        console.print(f"[green]copied:[/] {r.copied} shard(s), {_size(r.bytes_copied)}; {r.skipped} already there -> {r.url}")
    print(r.url)


@app.command()
def push(
    dataset: str = typer.Argument(..., help="Complete dataset directory or URL (ROOT/<fingerprint>)."),
    dest: str = typer.Argument(..., help="Root to copy it into (s3://bucket/kd, a path, ...); it lands at DEST/<fingerprint>."),
):
    """Copy a dataset to a shared store: sha256 checked per shard, resumable, manifest last."""
    _copy(dataset, dest)


@app.command()
def pull(
    src: str = typer.Argument(..., help="Dataset URL in a shared store (ROOT/<fingerprint>)."),
    dest: str = typer.Argument(..., help="Local root (or other store) to copy it into; it lands at DEST/<fingerprint>."),
):
    """Copy a dataset from a shared store: sha256 checked per shard, resumable, manifest last."""
    _copy(src, dest)


@app.command()
def upgrade(
    src: str = typer.Argument(..., help="A format v1 dataset (ROOT/<fingerprint>)."),
    dest: str = typer.Argument(..., help="Root for the v2 dataset; it lands at DEST/<new fingerprint>."),
):
    """Rewrite a format v1 dataset as v2 (plain ids and log-probs, explicit tail); print its URL."""
    from kdcore.progress import console
    from kdgen.upgrade import upgrade as run_upgrade

    url = run_upgrade(src, dest)
    console.print(f"[green]upgraded:[/] {src} (v1) -> {url} (v2)")
    print(url)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    run_cli(app, "kdgen", "complete shards are kept — run the same command again to resume")


if __name__ == "__main__":
    main()
