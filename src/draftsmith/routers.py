"""D-LLM routers: from a start layer on, each layer of the target gets a small router that reads a token's input
to that layer and decides whether the token runs it or passes it by unchanged.

Router: hidden -> Linear(hidden / 8) -> RMSNorm -> SiLU -> Linear(2); class 1 = execute, biased towards it at
initialisation. Trained with Gumbel-softmax decisions (`train/router.py`); at decode time a token executes where
class 1 scores higher. Saved as routers.safetensors + routers.json in a folder, loaded onto the target's device
and dtype. The routers are a `SkipPolicy` (sparse.py): the layer-skipping draft and the lossy sparse target use
them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from draftsmith.models import LoadedModel

WEIGHTS, CONFIG = "routers.safetensors", "routers.json"


@dataclass
class RouterConfig:
    hidden_size: int
    num_layers: int
    start_layer: int = 2  # layers before it always run
    bottleneck: int = 0  # router width; 0 = hidden_size // 8
    target_ratio: float = 0.5  # share of all layers a token should execute (what training aimed at)
    training: dict = field(default_factory=dict)  # how it was trained (command, data, wall time, measured ratio)

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.num_layers:
            raise ConfigError(f"the routers' start layer must be in 0..{self.num_layers - 1}, got {self.start_layer}")
        if not 0 < self.target_ratio <= 1:
            raise ConfigError(f"the executed-layer ratio must be in (0, 1], got {self.target_ratio}")
        floor = self.start_layer / self.num_layers
        if self.target_ratio < floor:
            raise ConfigError(f"ratio {self.target_ratio} is below the {self.start_layer} layers that always run "
                              f"({floor:.2f} of {self.num_layers}): raise --ratio or lower --start-layer")
        self.bottleneck = self.bottleneck or max(8, self.hidden_size // 8)


class Router(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.down, self.norm, self.out = nn.Linear(hidden, width), nn.RMSNorm(width), nn.Linear(width, 2)
        with torch.no_grad():  # start by executing nearly everything: the dense model is the starting point
            self.out.bias.copy_(torch.tensor([0.1, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.silu(self.norm(self.down(x))))


class Routers(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        self.routers = nn.ModuleList(Router(config.hidden_size, config.bottleneck)
                                     for _ in range(config.start_layer, config.num_layers))

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """[..., 2] skip / execute logits of tokens x [..., hidden] at `layer`; None for a layer without router."""
        if layer < self.config.start_layer:
            return None
        router = self.routers[layer - self.config.start_layer]
        return router(x.to(router.down.weight.dtype))  # the stream may be float32 where the routers are not

    @torch.inference_mode()
    def executes(self, layer: int, x: torch.Tensor) -> bool:
        logits = self.logits(layer, x)
        return logits is None or bool(logits[..., 1].item() > logits[..., 0].item())


def save_routers(routers: Routers, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in routers.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(asdict(routers.config), indent=1))


def load_routers(folder: Path, target: PreTrainedModel) -> Routers:
    """Routers trained for `target` (checked against its hidden size and depth), on its device and dtype."""
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ConfigError(f"no routers in {folder} (expected {CONFIG} and {WEIGHTS}): train them with "
                          f"`draftsmith train router --target ... --out {folder}`")
    config = RouterConfig(**json.loads((folder / CONFIG).read_text()))
    hidden, layers = target.config.hidden_size, target.config.num_hidden_layers
    if (config.hidden_size, config.num_layers) != (hidden, layers):
        raise ConfigError(f"the routers in {folder} were trained for a {config.num_layers}-layer target of hidden "
                          f"size {config.hidden_size}; this target has {layers} layers of {hidden}")
    routers = Routers(config)
    routers.load_state_dict(load_file(str(folder / WEIGHTS)))
    # on a CPU they stay float32 (as trained): a bf16 product this small takes torch's slow path (a profile of
    # layer-skipping drafts, taken while other jobs ran: a third of the time in the routers' products)
    dtype = torch.float32 if target.device.type == "cpu" else target.dtype
    return routers.to(device=target.device, dtype=dtype).eval()


def load_routers_for(spec: str, target: LoadedModel) -> Routers:
    """Routers from a folder, or (empty spec) those shipped for an embedded target."""
    from draftsmith.artifacts import shipped_file

    folder = Path(spec) if spec else shipped_file(target, "router", CONFIG, "train router").parent
    return load_routers(folder, target.model)
