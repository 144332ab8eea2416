"""One way to assemble an engine from what a user names: the target, a drafter spec, the backend, pruning or the
lossy sparse verification. `generate`, `serve` and `bench` all call it, so a flag means the same everywhere."""

from __future__ import annotations

from draftsmith.backends.protocol import BackendConfig
from draftsmith.drafters.registry import build_drafter
from draftsmith.engine import SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel
from draftsmith.predictor import build_pruner
from draftsmith.routers import load_routers_for
from draftsmith.sparse import RoutedVerify


def build_engine(loaded: LoadedModel, drafter: str = "auto", backend: BackendConfig = BackendConfig(),
                 prune: str = "none", lossy_sparse_verify: bool = False, routers: str = "", tokenizer: bool = True,
                 **drafter_options) -> SpecEngine:
    """`prune`: none, predictor[:DIR] or predictor-path[:DIR] (lossless); `lossy_sparse_verify`: the target
    verifies through routers (`routers`: a folder, or those shipped for the target) skipping layers (LOSSY);
    `tokenizer`: False for token ids in and out (the bench, which detokenizes nothing inside its timing)."""
    if routers and not lossy_sparse_verify:  # they would be ignored: the target verifies densely
        raise ConfigError("routers are for the lossy sparse verifier: add --lossy-sparse-verify, or for "
                          f"lossless layer skipping draft with them (--drafter layerskip:{routers})")
    sparse_verify = RoutedVerify(load_routers_for(routers, loaded)) if lossy_sparse_verify else None
    # routers trained with a LoRA (recipe upstream) route the target with it merged: the model they were trained on
    model = sparse_verify.routers.routed_model(loaded.model) if sparse_verify else loaded.engine_model
    return SpecEngine(model, build_drafter(drafter, loaded, **drafter_options),
                      loaded.tokenizer if tokenizer else None, backend=backend, pruner=build_pruner(prune, loaded),
                      sparse_verify=sparse_verify)
