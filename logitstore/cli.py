"""The ``logitstore`` command line: parse flags, build a config, call the Python API."""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional, TypeVar

import typer

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.progress import quiet_libraries

T = TypeVar("T")
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"show_default": True},
                  help="Run teachers once; store their top-k distributions for offline distillation.")


def fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def call(fn: Callable[[], T], *, resumable: bool = False) -> T:
    """Run ``fn`` (a call into the Python API); a :class:`LogitStoreError` becomes one line on
    stderr and exit code 2. Ctrl-C in a ``resumable`` command (one that commits part by part) says
    so in one line and exits 130."""
    try:
        return fn()
    except LogitStoreError as e:
        fail(e)
    except KeyboardInterrupt:
        if not resumable:
            raise
        typer.echo("interrupted; re-run the same command to resume", err=True)
        raise typer.Exit(130) from None


@app.command()
def dump(
    teacher: list[str] = typer.Option(..., "--teacher", help="[NAME=]PATH_OR_HUB_ID or a .gguf file; repeat for several teachers"),
    data: str = typer.Option(..., help=".txt (one document per file), .jsonl/.json, .parquet, a saved datasets directory, "
                                       "a directory of .txt files or a quoted glob ('corpus/*.jsonl'); directories and globs in sorted order"),
    out: str = typer.Option(..., help="store directory (or fsspec URL) to create or resume"),
    top_k: int = typer.Option(64, "--top-k", help="ids and log-probs kept per position (with --top-p: the most)"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="adaptive k: per position the fewest entries whose mass "
                                                                "reaches P (at least --min-k, at most --top-k/--max-k)"),
    min_k: int = typer.Option(1, "--min-k", help="with --top-p: entries kept at every position at least"),
    max_k: Optional[int] = typer.Option(None, "--max-k", help="with --top-p: another name for --top-k"),
    targets: str = typer.Option("topk", "--targets", help="topk, sampled (S teacher draws per position, unbiased) or both "
                                                           "(exact top-k plus S draws from the rest)"),
    samples: int = typer.Option(12, "--samples", help="with --targets sampled|both: draws per position (S)"),
    proposal_temperature: float = typer.Option(1.0, "--proposal-temperature", help="draws from p^(1/tau) (importance-weighted)"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window (2 .. the teacher's positions)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]"),
    dtype: str = typer.Option("auto", help="auto (bf16 on cuda, fp32 on cpu), bf16, fp16 or fp32"),
    format: str = typer.Option("zarr", "--format", help="zarr, or arrow (Parquet files; 'parquet' is accepted too)"),
    encoding: str = typer.Option("compact", help="compact or lossless"),
    value_bits: int = typer.Option(8, "--value-bits", help="compact: log-prob precision, 6, 7 or 8 (max error 1/4, 1/8, "
                                                           "1/16 nat; FORMAT.md)"),
    codebook: str = typer.Option("companded", "--codebook", help="compact: companded (fine steps where the probability "
                                                                 "is), or uniform (readable by versions before it)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="stop after this many corpus tokens"),
    text_field: str = typer.Option("text", "--text-field"),
    pack: Optional[bool] = typer.Option(None, "--pack/--no-pack", help="pack documents into full windows, or one document per "
                                                                      "window (default: pack, except token rows)"),
    input: str = typer.Option("auto", "--input", help="what --data rows hold: auto, text, messages (conversations) or tokens "
                                                      "(input_ids, optional labels/attention_mask/loss_mask)"),
    messages_field: str = typer.Option("messages", "--messages-field", help="the field holding a conversation"),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="a Jinja chat template file instead of the tokenizer's"),
    train_on: str = typer.Option("assistant", "--train-on", help="conversations: which tokens are trained, assistant or all"),
    overlong: Optional[str] = typer.Option(None, "--overlong", help="a conversation, token row or classified text longer than "
                                                                     "--seq-len: refuse (default), truncate (default for --task classify) or drop"),
    task: str = typer.Option("lm", "--task", help="lm (causal LM teachers) or classify (sequence classifiers: class logits per text)"),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="--task classify: the field holding each text's class"),
    hidden_layers: Optional[str] = typer.Option(None, "--hidden-layers", help="also store each teacher's hidden states at these "
                                                "layers (e.g. 2,4; 0 = embeddings, as output_hidden_states): per token, or pooled "
                                                "per text for --task classify"),
    hidden_dim: Optional[int] = typer.Option(None, "--hidden-dim", help="project hidden states to this width through a recorded "
                                                                        "random projection (default: the model's width)"),
    hidden_dtype: str = typer.Option("bf16", "--hidden-dtype", help="bf16 or fp16"),
    hidden_pooling: str = typer.Option("mean", "--hidden-pooling", help="--task classify: mean, first or last real token"),
    hidden_seed: int = typer.Option(0, "--hidden-seed", help="seed of the --hidden-dim projection (recorded in the manifest)"),
    doc_boundaries: str = typer.Option("auto", "--doc-boundaries", help="packed windows keep each document's attention to itself: "
                                                                         "auto (conversations and token rows), on or off"),
    bos: str = typer.Option("auto", "--bos", help="start each document with BOS: auto (the tokenizer's own convention), always or never"),
    shard_sequences: Optional[int] = typer.Option(None, "--shard-sequences", help="sequences per shard (default: ~524k tokens)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run custom model code from teacher repositories (off unless given)"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="place a teacher too big for one device with accelerate: "
                                                                          "auto, balanced, balanced_low_0, sequential or a JSON file of module -> device"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="with --device-map: per-device limits, e.g. 0=70GiB,1=70GiB,cpu=200GiB"),
    offload_folder: Optional[str] = typer.Option(None, "--offload-folder", help="with --device-map: where weights offloaded to disk go"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel ranks per teacher copy under torchrun (WORLD_SIZE = copies x tp)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars, summary or library warnings; errors still print"),
) -> None:
    """Run teachers over a corpus and write (or resume) a store. Under torchrun each rank writes its own shards."""
    from logitstore.capture.dump import DumpConfig, dump as run_dump

    if quiet:
        quiet_libraries()
    call(lambda: run_dump(DumpConfig(
        teachers=tuple(teacher), data=data, out=out, top_k=max_k or top_k, top_p=top_p, min_k=min_k, targets=targets, samples=samples,
        proposal_temperature=proposal_temperature, seq_len=seq_len, batch_size=batch_size, device=device,
        dtype=dtype, format=format, encoding=encoding, value_bits=value_bits, codebook=codebook, max_tokens=max_tokens,
        text_field=text_field, pack=pack, bos=bos,
        shard_sequences=shard_sequences, trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory,
        offload_folder=offload_folder, tp=tp, progress=not quiet, input=input, messages_field=messages_field,
        chat_template=chat_template, train_on=train_on, overlong=overlong, doc_boundaries=doc_boundaries,
        task=task, label_field=label_field, hidden_layers=hidden_layers, hidden_dim=hidden_dim, hidden_dtype=hidden_dtype,
        hidden_pooling=hidden_pooling, hidden_seed=hidden_seed)), resumable=True)


@app.command()
def info(store: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Teachers, tokenizer, sizes, bytes/token, mean top-k mass and entropy."""
    from logitstore.tools.info import format_info, info as get_info

    d = call(lambda: get_info(store))
    typer.echo(json.dumps(d, indent=1) if as_json else format_info(d))


@app.command("ls")
def ls(url: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
       max_depth: int = typer.Option(4, "--max-depth", help="directory levels to search below URL")) -> None:
    """The stores under a directory or prefix: id, teachers, tokens, k and size, one line each."""
    from logitstore.tools.info import format_list, list_stores

    rows = call(lambda: list_stores(url, max_depth))
    typer.echo(json.dumps(rows, indent=1) if as_json else format_list(rows))


@app.command()
def stats(store: str, plot: Optional[str] = typer.Option(None, "--plot", help="write a PNG of top-j mass and entropy"),
          as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Top-k mass coverage and teacher entropy per position (to choose k)."""
    from logitstore.tools.stats import format_stats, plot_stats, store_stats

    d = call(lambda: store_stats(store))
    typer.echo(json.dumps(d) if as_json else format_stats(d))
    if plot:
        typer.echo(f"plot: {plot_stats(d, plot)}", err=as_json)


@app.command()
def verify(store: str) -> None:
    """Check every checksum, shape, dtype and value range; exit 0 only if all hold."""
    from logitstore.tools.verify import verify as run_verify

    problems = run_verify(store)
    for p in problems:
        typer.echo(p)
    if problems:
        typer.echo(f"{store}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{store}: OK")


@app.command()
def merge(stores: list[str] = typer.Argument(..., help="stores to concatenate, in order"),
          out: str = typer.Option(..., "--out", help="new store directory (or fsspec URL)"),
          allow_shared: bool = typer.Option(False, "--allow-shared-sequences",
                                            help="merge even if stores share sequences (counted and reported; by default refused)"),
          quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Concatenate stores dumped with the same teachers and settings on different data."""
    from logitstore.tools.merge import merge as run_merge

    m = call(lambda: run_merge(stores, out, progress=not quiet, allow_shared=allow_shared), resumable=True)
    typer.echo(f"{out}: {m['n_sequences']:,} sequences, {m['n_tokens']:,} tokens from {len(stores)} stores")


@app.command()
def fuse(stores: list[str] = typer.Argument(..., help="one store with several teachers, or stores of the same data"),
         out: str = typer.Option(..., "--out", help="new single-teacher store"),
         teacher: Optional[list[str]] = typer.Option(None, "--teacher", help="teachers to fuse, in order (default: all)"),
         weights: Optional[str] = typer.Option(None, "--weights", help="comma-separated, one per teacher (default: equal)"),
         temperature: Optional[str] = typer.Option(None, "--temperature", help="comma-separated, one per teacher (default: 1)"),
         mode: str = typer.Option("mean-probs", "--mode", help="mean-probs or mean-logits"),
         top_k: Optional[int] = typer.Option(None, "--top-k", help="ids kept per position (default: the largest teacher k)"),
         name: str = typer.Option("fused", "--name", help="the fused teacher's name"),
         quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Write the fused targets of several teachers as a new single-teacher store."""
    from logitstore.tools.fuse import fuse_store

    m = call(lambda: fuse_store(stores, out, teachers=teacher or None, weights=_floats(weights, "--weights"),
                                temperatures=_floats(temperature, "--temperature"), mode=mode, top_k=top_k, name=name,
                                progress=not quiet), resumable=True)
    t = m["teachers"][0]
    typer.echo(f"{out}: {t['name']} = {t['fusion']['mode']} of {', '.join(x['name'] for x in t['fusion']['teachers'])}, "
               f"k={t['k']}, top-k mass {t['stats']['mean_topk_mass']:.3f}")


@app.command()
def export(store: str, out: str = typer.Option(..., "--out"), to: str = typer.Option("parquet", "--to", help="parquet or hf"),
           quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """A Parquet (or saved datasets) view of a store, one decoded row per sequence."""
    from logitstore.tools.export import export as run_export

    s = call(lambda: run_export(store, out, to, progress=not quiet))
    typer.echo(f"{out}: {s['rows']:,} rows ({s['format']})")


@app.command()
def convert(store: str, out: str = typer.Option(..., "--out"), to: str = typer.Option(..., "--to", help="zarr or arrow"),
            quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """The same store in the other backend (zarr <-> arrow); values and store id unchanged."""
    from logitstore.tools.convert import convert as run_convert

    m = call(lambda: run_convert(store, out, to, progress=not quiet), resumable=True)
    typer.echo(f"{out}: {m['backend']}, {m['total_bytes'] / 1e6:.2f} MB")


def _floats(raw: Optional[str], flag: str) -> Optional[list[float]]:
    if raw is None:
        return None
    try:
        return [float(x) for x in raw.split(",")]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {raw!r}") from None


def main() -> None:
    app(prog_name="logitstore")


if __name__ == "__main__":
    sys.exit(main())
