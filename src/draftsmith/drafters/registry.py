"""Drafters by name: `build_drafter` turns a spec (`ngram`, `eagle:DIR`, `cascade:...`) into a drafter for a
target; the spec grammar lives here and nowhere else."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from draftsmith.artifacts import draft_model_path, shipped_file, shipped_head
from draftsmith.drafters.base import Drafter
from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from draftsmith.models import LoadedModel

# What `auto` picks: prompt lookup with the adaptive draft length, the fastest lossless drafter on CPUs in every
# full HumanEval run (docs/results/2026-11-27-cpu-peers-avx512.md and -avx2.md), where a head's drafting costs more
# than its higher tau brings. The heads stay one flag away (`eagle+ngram`).
DEFAULT_DRAFTER = "ngram"


def build_drafter(spec: str, target: LoadedModel, **options) -> Drafter | None:
    """`auto`, `none`, `ngram`, `model:PATH` (a smaller causal LM with the target's tokenizer), `student[:DIR]`
    (the distilled student shipped for the target, or one in DIR), `mag[:FILE]` (prompt lookup + bigram chain),
    `cascade[:K-MATRIX|:upstream[-lL]|:FILE.toml]` (CS-Drafting), `layerskip[:auto|:DIR|:skip=LAYERS]`
    (self-speculation),
    `eagle[:DIR]`, `eagle+ngram[:DIR]`, `eagle3[:DIR]`, `eagle3+ngram[:DIR]`, `medusa[:DIR]` or `ctc[:DIR]`."""
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

        from draftsmith.backends.format_choice import drafter_format
        from draftsmith.backends.protocol import BackendConfig

        fmt = drafter_format(target.engine_model)  # beside a 4-bit target: its block products
        return ModelDrafter(draft_model(spec, target), vocab_size=logit_rows(target.engine_model),
                            backend=BackendConfig(weights=fmt.name if fmt is not None else "auto"))
    if kind == "mag":
        from draftsmith.drafters.mag import BigramTable, MagDrafter

        table = Path(path) if path else shipped_file(target, "bigram", "bigram.safetensors", "train bigram",
                                                           "its PATH after 'mag:'")
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

        return build_cascade(parse_cascade(path), level, vocab_size=logit_rows(target.engine_model))
    if kind == "layerskip":
        from draftsmith.drafters.layerskip import LayerSkipDrafter
        from draftsmith.models import logit_rows

        return LayerSkipDrafter(skip_policy(path, target), vocab_size=logit_rows(target.engine_model),
                                tokenizer=target.tokenizer, confidence=options.get("confidence", 0.0))
    if kind in ("eagle+ngram", "eagle3+ngram"):  # the head's tree with prompt lookup's chain grafted on
        kind, options = kind.removesuffix("+ngram"), {"lookup": 8, **options}
    if kind in ("eagle", "eagle3", "medusa", "ctc"):
        return _head_drafter(kind, path, target, options)
    raise ConfigError(f"unknown drafter '{spec}': use auto, none, ngram, model:PATH, student[:DIR], mag[:FILE], "
                      "cascade[:K-MATRIX|:upstream[-lL]|:FILE.toml], layerskip[:auto|:DIR|:skip=LAYERS], eagle[:DIR], "
                      "eagle+ngram[:DIR], eagle3[:DIR], eagle3+ngram[:DIR], medusa[:DIR] or ctc[:DIR]")


def skip_policy(spec: str, target: LoadedModel):
    """`auto` (None: searched once bound to the target), `skip=2,5,7-9` (those layers), a router folder, or
    nothing: the routers shipped for the target."""
    from draftsmith.sparse import FixedSkip

    if spec == "auto":
        return None
    layers = target.engine_model.config.num_hidden_layers
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
    """The draft LM of `model:PATH` or `student[:DIR]`, loaded like the target and checked to share its
    vocabulary; where PATH holds a LoRA adapter (collab finetune) on a small model named inside it, that small
    model with the adapter merged. A trailing `:layers=N` keeps only its first N layers (a smaller, untrained
    draft level under the full model: `student:layers=3`)."""
    from draftsmith.collab.finetune import is_finetuned, load_small
    from draftsmith.models import load_draft_model

    spec, keep = _split_layers(spec)
    if keep is not None:
        return first_layers(draft_model(spec, target), keep)
    path = draft_model_path(spec, target)
    if is_finetuned(Path(path)):
        return load_small(Path(path), target)
    return load_draft_model(path, target)


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


def _head_drafter(kind: str, path: str, target: LoadedModel, options: dict) -> Drafter:
    from draftsmith.drafters.ctc import CtcDrafter, CtcSearch
    from draftsmith.drafters.eagle import EagleDrafter, TreeConfig
    from draftsmith.drafters.medusa import MedusaDrafter
    from draftsmith.heads import load_head
    from draftsmith.backends.llamacpp import LlamaCppModel

    if isinstance(target.model, LlamaCppModel):  # a head reads the target's hidden states, which llama.cpp keeps
        raise ConfigError(f"the {kind} drafter reads the target's hidden states, which the llama.cpp backend does "
                          "not expose: use --backend torch, or a drafter that needs only tokens (ngram, mag, "
                          "model:PATH, student)")
    head = load_head(Path(path) if path else shipped_head(kind, target), target.model)
    if head.config.kind != kind:
        raise ConfigError(f"{path} holds a {head.config.kind} head, not a {kind} head: use --drafter {head.config.kind}:{path}")
    if kind in ("eagle", "eagle3"):
        from draftsmith.drafters.eagle3 import Eagle3Drafter

        tree = TreeConfig.for_device(target.model.device, **{k: v for k, v in options.items() if k in ("depth", "top_k")})
        drafter = (EagleDrafter if kind == "eagle" else Eagle3Drafter)(head, target.model, tree,
                                                                       graphs=options.get("graphs"))
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
