"""`draftsmith train bigram` (the old `build-bigram`, kept as a hidden alias): the successor table of
CS-Drafting's MaG drafter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from draftsmith.cli.options import Target, TrustRemoteCode
from draftsmith.cli.options import CorpusFolder, corpus_source


def build_bigram_command(
    target: Target = "smollm2",
    out: Annotated[Path, typer.Option("--out", "-o", help="The table's file (safetensors).")] = Path("runs/bigram.safetensors"),
    corpus: CorpusFolder = None,
    onpolicy: Annotated[Optional[Path], typer.Option(help="Also count the target's own replies in this folder of "
                                                          "on-policy data (`draftsmith distill` writes one).")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Count token successors in a code corpus with the target's tokenizer (MaG's bigram chain)."""
    from draftsmith.data.corpus import load_corpus
    from draftsmith.drafters.mag import build_bigram
    from draftsmith.models import load_tokenizer

    corpus_source(corpus)  # a missing corpus is refused before anything loads
    start = time.perf_counter()
    tokenizer = load_tokenizer(target, trust_remote_code)
    docs = load_corpus(corpus)
    written = []
    if onpolicy is not None:
        from draftsmith.data.onpolicy import OnPolicyData

        data = OnPolicyData(onpolicy, "train")
        written = [row[mask.bool()].tolist() for row, mask in zip(data.input_ids[:, -data.new_tokens :], data.generated)]
    table = build_bigram(tokenizer, docs, sequences=written)
    table.save(out)
    known = int((table.successor >= 0).sum())
    typer.echo(f"bigram table for {known} of {len(table.successor)} tokens ({len(docs)} files, {len(written)} "
               f"on-policy replies) saved in {out} "
               f"in {time.perf_counter() - start:.0f} s")
