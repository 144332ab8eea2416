"""D-LLM routers: from a start layer on, each layer of the target gets a small router that reads a token's input
to that layer and decides whether the token runs it or passes it by unchanged.

Router: hidden -> Linear(hidden / 8) -> RMSNorm -> SiLU -> Linear(2); class 1 = execute, biased towards it at
initialisation. Trained with Gumbel-softmax decisions (`train/router.py`); at decode time a token executes where
class 1 scores higher, by more than the config's `margin` (0 unless `train router-share` calibrated one, to run
routers of different trainings at one executed share). Saved as routers.safetensors + routers.json in a folder, loaded onto the target's device
and dtype. The routers are a `SkipPolicy` (sparse.py): the layer-skipping draft and the lossy sparse target use
them.

Two options come from SpaDec's recipe (`train router --recipe upstream`): a robust router reads its input quantized
to a few bits per token (`input_bits`), and the folder may carry a LoRA adapter on the target trained with the
routers (peft's adapter_config.json + adapter_model.safetensors); `routed_model` merges it into a copy of the target,
so the sparse verifier runs the model the routers were trained with.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from draftsmith.models import LoadedModel

WEIGHTS, CONFIG = "routers.safetensors", "routers.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's: a LoRA on the target
RECIPES = ("distil", "upstream")


@dataclass
class RouterConfig:
    hidden_size: int
    num_layers: int
    start_layer: int = 2  # layers before it always run
    bottleneck: int = 0  # router width; 0 = hidden_size // 8
    target_ratio: float = 0.5  # share of all layers a token should execute (what training aimed at)
    input_bits: int = 0  # robust router: its input quantized to this many bits per token (SpaDec's 4); 0 = off
    recipe: str = "distil"  # how they were trained (train/router.py)
    margin: float = 0.0  # execute where the execute logit beats skip by more than this (`train router-share`)
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
        if self.input_bits and not 2 <= self.input_bits <= 8:
            raise ConfigError(f"a robust router quantizes its input to 2..8 bits, got {self.input_bits}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown router recipe {self.recipe!r}: use {' or '.join(RECIPES)}")
        self.bottleneck = self.bottleneck or max(8, self.hidden_size // 8)


def quantize_levels(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row of x [..., hidden] as integer levels 0 .. 2^bits - 1 between its own min and max (asymmetric,
    per token), returned as levels, not dequantized: what SpaDec's robust router reads. Nearby states map to the
    same levels, so consecutive tokens tend to decide alike."""
    top = 2**bits - 1
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = (high - low) / top + 1e-7  # upstream's epsilon: a constant row maps to level 0, not a division by 0
    return torch.round((x - low) / step).clamp(0, top)


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
        self.adapter: Path | None = None  # folder of the LoRA trained with them (recipe upstream), if any

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """[..., 2] skip / execute logits of tokens x [..., hidden] at `layer`; None for a layer without router."""
        if layer < self.config.start_layer:
            return None
        router = self.routers[layer - self.config.start_layer]
        if self.config.input_bits:  # levels in float32: a bf16 min/max would round the step
            x = quantize_levels(x.float(), self.config.input_bits)
        return router(x.to(router.down.weight.dtype))  # the stream may be float32 where the routers are not

    def decide(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """[...] True where a token executes `layer` (decoding's rule); None for a layer without router."""
        logits = self.logits(layer, x)
        return None if logits is None else logits[..., 1] - logits[..., 0] > self.config.margin

    @torch.inference_mode()
    def executes(self, layer: int, x: torch.Tensor) -> bool:
        runs = self.decide(layer, x)
        return runs is None or bool(runs.item())

    def routed_model(self, target: PreTrainedModel) -> PreTrainedModel:
        """The model these routers route: `target` itself, or where they carry a LoRA, a copy of it with the
        adapter merged (the copy shares every weight the LoRA leaves alone; `target` is not changed)."""
        if self.adapter is None:
            return target
        from peft import PeftModel

        adapted = set(json.loads((self.adapter / ADAPTER_CONFIG).read_text()).get("target_modules") or [])
        changed = {id(p) for name, p in target.named_parameters() if name.rsplit(".", 2)[-2] in adapted}
        shared = {id(p): p for p in target.parameters() if id(p) not in changed}
        merged = PeftModel.from_pretrained(copy.deepcopy(target, shared), str(self.adapter)).merge_and_unload()
        return merged.eval()


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
    adapter_files = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (folder / name).is_file()]
    if config.recipe == "upstream" and len(adapter_files) < 2:  # without it they would route another model
        missing = " and ".join(name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if name not in adapter_files)
        raise ConfigError(f"the routers in {folder} were trained with a LoRA on the target (recipe upstream), but "
                          f"its {missing} is missing there")
    if config.recipe != "upstream" and adapter_files:  # a stray adapter would change the model they route
        raise ConfigError(f"the routers in {folder} were trained on the frozen target (recipe {config.recipe}), "
                          f"yet the folder holds a LoRA ({', '.join(adapter_files)}): remove it, or use its own folder")
    routers.adapter = folder if adapter_files else None
    if routers.adapter is not None:
        modules = json.loads((folder / ADAPTER_CONFIG).read_text()).get("target_modules")
        if not isinstance(modules, list) or not modules:  # a pattern would leave the copy's weights shared
            raise ConfigError(f"the LoRA in {folder} must name its target modules as a list (q_proj, k_proj, "
                              f"v_proj as `train router` writes), got {modules!r}")
    # on a CPU they stay float32 (as trained): a bf16 product this small takes torch's slow path (a profile of
    # layer-skipping drafts, taken while other jobs ran: a third of the time in the routers' products)
    dtype = torch.float32 if target.device.type == "cpu" else target.dtype
    return routers.to(device=target.device, dtype=dtype).eval()


def load_routers_for(spec: str, target: LoadedModel) -> Routers:
    """Routers from a folder, or (empty spec) those shipped for an embedded target."""
    from draftsmith.artifacts import shipped_file

    folder = Path(spec) if spec else shipped_file(target, "router", CONFIG, "train router",
                                                    "PATH to --routers (or draft with layerskip:PATH)").parent
    return load_routers(folder, target.engine_model)
