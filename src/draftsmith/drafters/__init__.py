"""Drafters: each proposes a Draft for the target to verify. One protocol, one small module each.

A drafter sees only the committed token sequence (prompt + accepted output). That sequence grows by appends
within a request; anything a drafter drafted beyond it was rejected, so it rolls its own state back to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.draft import Draft
from draftsmith.errors import ConfigError

SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "shipped"  # heads trained for the embedded models

if TYPE_CHECKING:
    from draftsmith.models import LoadedModel


class Drafter(Protocol):
    """The two methods every drafter has. Optional, found by the engine where a drafter has them:
    `cost_per_token()` (seconds per drafted token, for the adaptive draft length), `draft_kind(context)` (what
    the next proposal will be, e.g. the n-gram match length: one acceptance estimate per kind), `sizes_itself`
    (a tree drafter that sizes its trees from the cost curve), `bind(runner)` (self-speculation on the target's
    own layers) and `statistics()` (per-request numbers for the bench)."""

    name: str

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        """A new request starts with this prompt."""

    def propose(self, context: list[int], k: int) -> Draft:
        """Up to k draft tokens (for trees: nodes) continuing `context` (the committed tokens)."""


@dataclass
class Feedback:
    """What the target just committed, for drafters that draft from the target's own features (heads, CTC).

    After the prefill: the prompt's tokens but the last; after a step: the root and the accepted draft nodes.
    `features[i]` is the target's last-layer hidden state (before its final norm) at the i-th committed position
    and `next_tokens[i]` the token that follows it there, so `next_tokens[-1]` is the newest committed token
    (the next root, whose features the target has not computed yet). `accepted` lists the draft's accepted
    node ids (empty after the prefill)."""

    features: torch.Tensor  # [m, hidden]
    next_tokens: list[int]  # m tokens
    accepted: list[int] = field(default_factory=list)
    pruned: bool = False  # the target verified a part of the proposal (a pruner's path): `accepted` indexes that


class FeatureDrafter(Drafter, Protocol):
    """A drafter that needs the target's features: the engine asks the target for them and hands them over
    through one `feedback` call after the prefill and after every step, never by running the target again."""

    needs_features: bool  # True

    def feedback(self, step: Feedback) -> None: ...


# What `auto` picks: prompt lookup with the adaptive draft length, the fastest lossless drafter in every
# 164-prompt run since the fused CPU kernels made the target's step cheap (AVX-512 bf16: 190 tok/s against the
# shipped EAGLE head + lookup's 180; AVX2: 42.7 against 37.7; README "CPU speed against llama.cpp"), where the
# head's ~3 ms of drafting a step outweighs its higher tau. The heads stay one flag away (`eagle+ngram`).
DEFAULT_DRAFTER = "ngram"


def build_drafter(spec: str, target: LoadedModel, **options) -> Drafter | None:
    """`auto`, `none`, `ngram`, `model:PATH` (a smaller causal LM with the target's tokenizer), `student[:DIR]`
    (the distilled student shipped for the target, or one in DIR), `mag[:FILE]` (prompt lookup + bigram chain),
    `cascade[:K-MATRIX|:upstream[-lL]|:FILE.toml]` (CS-Drafting), `layerskip[:auto|:DIR|:skip=LAYERS]` (self-speculation),
    `eagle[:DIR]`, `eagle+ngram[:DIR]`, `medusa[:DIR]` or `ctc[:DIR]`."""
    if spec in ("none", "", None):
        return None
    if spec == "auto":
        spec = DEFAULT_DRAFTER
    kind, _, path = spec.partition(":")
    if spec == "ngram":
        from draftsmith.drafters.ngram import NgramDrafter

        return NgramDrafter(**{k: v for k, v in options.items() if k in ("min_n", "max_n", "branches")})
    if kind in ("model", "student"):
        from draftsmith.drafters.model import ModelDrafter
        from draftsmith.models import logit_rows

        return ModelDrafter(draft_model(spec, target), vocab_size=logit_rows(target.model))
    if kind == "mag":
        from draftsmith.drafters.mag import BigramTable, MagDrafter

        table = Path(path) if path else shipped_file(target, "bigram", "bigram.safetensors", "build-bigram")
        return MagDrafter(BigramTable.load(table, target.tokenizer))
    if kind == "cascade":
        from draftsmith.drafters.cascade import build_cascade, parse_cascade
        from draftsmith.models import logit_rows

        def level(level_spec: str):
            if level_spec.partition(":")[0] in ("model", "student"):
                return "model", draft_model(level_spec, target)
            if level_spec.partition(":")[0] in ("mag", "ngram"):
                return "drafter", build_drafter(level_spec, target)
            raise ConfigError(f"cascade level '{level_spec}': use model:PATH, student[:DIR], mag[:FILE] or ngram")

        return build_cascade(parse_cascade(path), level, vocab_size=logit_rows(target.model))
    if kind == "layerskip":
        from draftsmith.drafters.layerskip import LayerSkipDrafter
        from draftsmith.models import logit_rows

        return LayerSkipDrafter(skip_policy(path, target), vocab_size=logit_rows(target.model),
                                tokenizer=target.tokenizer, confidence=options.get("confidence", 0.0))
    if kind == "eagle+ngram":  # the head's tree with prompt lookup's chain grafted on
        kind, options = "eagle", {"lookup": 8, **options}
    if kind in ("eagle", "medusa", "ctc"):
        return _head_drafter(kind, path, target, options)
    raise ConfigError(f"unknown drafter '{spec}': use auto, none, ngram, model:PATH, student[:DIR], mag[:FILE], "
                      "cascade[:K-MATRIX|:upstream[-lL]|:FILE.toml], layerskip[:auto|:DIR|:skip=LAYERS], eagle[:DIR], "
                      "eagle+ngram[:DIR], medusa[:DIR] or ctc[:DIR]")


def skip_policy(spec: str, target: LoadedModel):
    """`auto` (None: searched once bound to the target), `skip=2,5,7-9` (those layers), a router folder, or
    nothing: the routers shipped for the target."""
    from draftsmith.sparse import FixedSkip

    if spec == "auto":
        return None
    layers = target.model.config.num_hidden_layers
    if spec.startswith("skip="):
        skipped = set()
        try:
            for part in filter(None, spec.removeprefix("skip=").split(",")):
                first, _, last = part.partition("-")
                skipped.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ConfigError(f"layerskip:{spec}: give layer numbers and ranges, e.g. skip=2,5,7-9") from None
        return FixedSkip(layers, frozenset(skipped))
    from draftsmith.routers import load_routers_for

    return load_routers_for(spec, target)  # no spec: the routers shipped for an embedded target


def draft_model(spec: str, target: LoadedModel):
    """The draft LM of `model:PATH` or `student[:DIR]`, loaded like the target (device, dtype) and checked to
    share its vocabulary. A trailing `:layers=N` keeps only its first N layers (a smaller, untrained draft
    level under the full model: `student:layers=3`)."""
    from draftsmith.models import check_same_vocabulary, load_model

    spec, keep = _split_layers(spec)
    if keep is not None:
        return first_layers(draft_model(spec, target), keep)
    kind, _, path = spec.partition(":")
    if kind == "model" and not path:
        raise ConfigError("give the draft model after 'model:', e.g. model:runs/student")
    if kind == "student" and not path:
        path = str(shipped_file(target, "student", "config.json", "distill").parent)
    from draftsmith.collab.finetune import is_finetuned, load_small

    if is_finetuned(Path(path)):  # a LoRA adapter (collab finetune) on a small model named inside it
        return load_small(Path(path), target)
    draft = load_model(path, device=str(target.device), dtype=str(target.dtype).removeprefix("torch."))
    check_same_vocabulary(target, draft)
    return draft.model


def _split_layers(spec: str) -> tuple[str, int | None]:
    head, _, last = spec.rpartition(":")
    if not head or not last.startswith("layers="):
        return spec, None
    count = last.removeprefix("layers=")
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"'{spec}': layers=N keeps the first N layers, N a whole number >= 1")
    return head, int(count)


def first_layers(model, keep: int):
    """The model with only its first `keep` decoder layers (then its final norm and head), in place."""
    layers = model.model.layers
    if keep > len(layers):
        raise ConfigError(f"layers={keep}: the model has only {len(layers)} layers")
    model.model.layers = layers[:keep]
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:keep]
    return model


def shipped_file(target: LoadedModel, kind: str, filename: str, command: str) -> Path:
    """A file the package ships for an embedded target (the student, the bigram table), or a clear error."""
    path = shipped_head_folder(target.name, kind) / filename
    if not path.is_file():
        raise ConfigError(f"no {kind} ships for target '{target.name}': make one with `draftsmith {command} "
                          f"--target {target.name} --out PATH` and give its PATH after '{kind}:'")
    return path


def shipped_head_folder(target_name: str, kind: str) -> Path:
    """Where the package keeps the `kind` head trained for an embedded target (it may not exist). A benchmark's
    target cast to another dtype (`smollm2@bfloat16`) uses its model's heads: a head is cast on loading."""
    return SHIPPED_HEADS / f"{target_name.split('@')[0]}-{kind}"


def shipped_head(kind: str, target: LoadedModel) -> Path:
    """The head shipped in the package for an embedded target (`--drafter eagle` with no folder)."""
    folder = shipped_head_folder(target.name, kind)
    if not folder.is_dir():
        shipped = sorted(p.name for p in SHIPPED_HEADS.glob("*")) if SHIPPED_HEADS.is_dir() else []
        raise ConfigError(f"no {kind} head ships for target '{target.name}' (shipped: {', '.join(shipped) or 'none'}); "
                          f"train one with `draftsmith train heads --kind {kind} --target {target.name} --out DIR` "
                          f"and use --drafter {kind}:DIR")
    return folder


def _head_drafter(kind: str, path: str, target: LoadedModel, options: dict) -> Drafter:
    from draftsmith.drafters.ctc import CtcDrafter, CtcSearch
    from draftsmith.drafters.eagle import EagleDrafter, TreeConfig
    from draftsmith.drafters.medusa import MedusaDrafter
    from draftsmith.heads import load_head

    head = load_head(Path(path) if path else shipped_head(kind, target), target.model)
    if head.config.kind != kind:
        raise ConfigError(f"{path} holds a {head.config.kind} head, not a {kind} head: use --drafter {head.config.kind}:{path}")
    if kind == "eagle":
        tree = TreeConfig.for_device(target.model.device, **{k: v for k, v in options.items() if k in ("depth", "top_k")})
        drafter = EagleDrafter(head, target.model, tree, graphs=options.get("graphs"))
        if options.get("lookup"):
            from draftsmith.drafters.merged import TreeWithLookup
            from draftsmith.drafters.ngram import NgramDrafter

            lookup = NgramDrafter(**{k: v for k, v in options.items() if k in ("min_n", "max_n")})
            return TreeWithLookup(drafter, lookup, max_chain=options["lookup"])
        return drafter
    if kind == "ctc":
        search = {key: value for key, value in options.items() if key in ("top_k", "beams", "levels")}
        return CtcDrafter(head, target.model, CtcSearch(**search), graphs=options.get("graphs"))
    return MedusaDrafter(head, target.model)
