"""gamma-MoD: "gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language Models"
(Luo et al., 2024, arXiv:2410.13859), training and inference with one shared router.

Site: `route`, mode "skip", with a token gate in every call. ONE router, `Linear(d, 2)` without bias,
shared by every routed layer, reads the layer's normalised input x_n (its input norm applied):

    p_i = softmax(router(x_n,i))[1]
    running token:  x + attn(x) + p * mlp(...)      (every running token, text included)
    resting token:  x                                (no query, no key or value, no MLP)

Training (`model.train()`): only the visual tokens compete; per sample, with n of them, the
k = n - floor(n * (1 - capacity)) highest p run (capacity 0.5: the original's
top_k = ceil(L * (1 - 0.5 * 1059 / L)) rests half of its 1059 image-and-system tokens); the
auxiliary loss is the cross-entropy of the router's logits against the top-k targets (1 for every
running token, text included, 0 for the resting ones), averaged over the valid tokens of a layer,
summed over the routed layers and weighted 0.01 (`auxiliary_loss`). Inference: the prefill runs the
visual tokens with p > threshold (0.005); a generated token with p < 0.5 skips the layer entirely and
writes no key or value there. Routed layers: given (`layers=`), the `count` lowest-ARank layers of a
`vlmkit analyze arank` file (`arank=`), or the original's `arank_mod` default, every layer but the
first three and the last.

Follows Yaxin9Luo/Gamma-MOD @5de27f2, `gamma_mod/model/language_model/llava_llama_mod.py`:
`MoDLlamaDecoderLayer_forward` (training: masked top-k, p-weighted MLP, `aux_loss`),
`MoDLlamaDecoderLayer_forward_inference` (the 0.005 prefill threshold, the 0.5 decoding skip),
`initialize_mod_modules` (the shared router, `arank_mod`), `MoDLLaVALlamaForCausalLM.forward`
(`router_aux_loss_coef` 0.01). Deviations, and why:
- no constant depends on a token count (the original hard-codes 1059 = 1024 image + 35 system tokens):
  the competing tokens are each sample's own visual tokens, whatever its resolution and padding;
- the system prompt does not compete and prompt text always runs at inference (the original lets its
  35 system tokens compete in training and thresholds every prefill token at inference; trained to
  target 1 they pass the threshold);
- tokens keep their positions in every layer (the original re-indexes each layer's running tokens
  0..k-1, so that a token's rotary position depends on the layer and, when decoding, on that layer's
  own cache length);
- per sample and batched (the original runs batch size 1 at inference: `nonzero().view(1, -1)`);
- padding is left out of the auxiliary loss (the original averages over every position);
- without a routers file the router is initialised as `nn.Linear` does, from a fixed seed, so that
  an untrained gamma-MoD is reproducible.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.engine.contexts import GateContext, Route, RouteContext, TokenGate
from vlmkit.errors import ConfigError
from vlmkit.methods.base import MethodConfig, Router, layer_list, top_k_sorted
from vlmkit.methods.depth.router_files import check_routers, read_routers, write_routers
from vlmkit.registry import register_method

AUX_COEFFICIENT = 0.01  # router_aux_loss_coef
DECODE_THRESHOLD = 0.5  # a generated token with p below this skips the layer
ROUTER_SEED = 0
SETTINGS = ("layers", "arank", "count")


@dataclass(frozen=True)
class GammaMoDConfig(MethodConfig):
    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "routed decoder layers; none: from `arank`, else all but the first three and the last"}
    )
    arank: str | None = field(default=None, metadata={"help": "a `vlmkit analyze arank` JSON: route its `count` lowest-ARank layers"})
    count: int | None = field(default=None, metadata={"help": "how many layers to route with `arank`"})
    capacity: float = field(default=0.5, metadata={"help": "training: share of each sample's visual tokens that run a routed layer"})
    threshold: float = field(default=0.005, metadata={"help": "inference: a visual token runs a routed layer when p > threshold"})
    routers: str | None = field(
        default=None, metadata={"help": "a trained router: a safetensors file, its folder or a shipped name (vlmkit train mod)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("capacity", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"gammamod: {name}={value!r} is out of range: it lies in [0, 1]")
        if self.layers is not None:
            object.__setattr__(self, "layers", layer_list("gammamod", "layers", self.layers, minimum=0))
        if (self.arank is None) != (self.count is None):
            raise ConfigError("gammamod: give `arank` (an ARank file) and `count` (how many layers) together")
        if self.arank is not None and self.layers is not None:
            raise ConfigError("gammamod: give either `layers` or `arank` with `count`, not both")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1):
            raise ConfigError(f"gammamod: count={self.count!r} must be a positive number of layers")


@register_method("gammamod", family="depth", sites="route")
class GammaMoD(Router):
    """gamma-MoD: one shared router skips visual tokens in the routed layers (p-weighted MLP) and lets decoding tokens skip layers."""

    Config = GammaMoDConfig
    example = "layers=(1, 2),threshold=0.5"
    paper = "https://arxiv.org/abs/2410.13859"
    needs = frozenset({"normed"})
    gates_tokens = True

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.router = _default_router(1)
        self.router_layers: tuple[int, ...] = ()
        self._file = None if self.config.routers is None else read_routers("gammamod", self.config.routers)
        self._auxiliary: list[torch.Tensor] = []

    def routed_layers(self, num_layers: int) -> tuple[int, ...]:
        config = self.config
        if config.layers is not None:
            layers = config.layers
        elif config.arank is not None:
            layers = _lowest_rank_layers(config.arank, config.count, num_layers)
        else:
            layers = tuple(layer for layer in range(num_layers) if layer not in {0, 1, 2, num_layers - 1})
            if not layers:
                raise ConfigError(
                    f"gammamod: the default routed layers (all but the first three and the last) leave none of a "
                    f"{num_layers}-layer model; give `layers` or `arank` with `count`"
                )
        if max(layers) >= num_layers:
            raise ConfigError(f"gammamod: routed layers {layers} are out of range for a model with {num_layers} decoder layers (0..{num_layers - 1})")
        return layers

    def check_adapter(self, adapter) -> None:
        hidden = adapter.text_config.hidden_size
        routed = self.routed_layers(len(adapter.decoder_layers))
        if self._file is not None:
            check_routers("gammamod", self._file, adapter, routed)
        if self.router_layers == routed and self.router.in_features == hidden:
            return  # already built for this shape (e.g. applied again)
        self.router_layers = routed
        self.router = _default_router(hidden)
        if self._file is not None:
            with torch.no_grad():
                self.router.weight.copy_(self._file[0]["router.weight"])

    def probabilities(self, normed: torch.Tensor) -> torch.Tensor:
        """p = softmax(router(x_n))[..., 1] for (..., D) normalised inputs."""
        router = self.router.to(device=normed.device, dtype=normed.dtype)
        return F.softmax(router(normed), dim=-1)[..., 1]

    def route(self, context: RouteContext) -> Route:
        runs = []
        with torch.set_grad_enabled(context.training and torch.is_grad_enabled()):
            logits = self.router.to(device=context.normed.device, dtype=context.normed.dtype)(context.normed)
            p = F.softmax(logits, dim=-1)[..., 1].detach()
            target = context.valid.long().clone()  # text runs: target 1
            for row, visual in enumerate(context.visual):
                scores = p[row, visual.slots]
                if context.training:
                    rest = int(len(visual) * (1 - self.config.capacity))
                    running = top_k_sorted(scores, len(visual) - rest)
                    target[row, visual.slots] = 0
                    target[row, visual.slots[running]] = 1
                else:
                    running = torch.nonzero(scores > self.config.threshold).squeeze(-1)
                runs.append(running)
            if context.training:
                valid = context.valid
                self._auxiliary.append(F.cross_entropy(logits[valid].float(), target[valid]))
        return Route(runs, mode="skip")

    def gate(self, context: GateContext) -> TokenGate:
        with torch.set_grad_enabled(context.training and torch.is_grad_enabled()):
            p = self.probabilities(context.normed)
        return TokenGate(weights=p, rest=p.detach() < DECODE_THRESHOLD)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """0.01 x the sum over routed layers of the router's top-k cross-entropy since the last call (training)."""
        losses, self._auxiliary = self._auxiliary, []
        return AUX_COEFFICIENT * torch.stack(losses).sum() if losses else None

    def trainable(self) -> nn.Module:
        """The parameters a fine-tune trains besides the model: the shared router."""
        return self.router

    def save(self, adapter, path) -> None:
        """Write the router with the model's weights hash and the routed layers (`routers=` reads it)."""
        if self.router.in_features == 1:
            self.check_adapter(adapter)
        config = {k: v for k, v in asdict(self.config).items() if k in SETTINGS}
        write_routers("gammamod", path, {"router.weight": self.router.weight}, adapter, self.router_layers, config)


def _default_router(hidden: int) -> nn.Linear:
    """`nn.Linear(hidden, 2, bias=False)` with its default initialisation, drawn from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ROUTER_SEED)
        return nn.Linear(hidden, 2, bias=False)


def _lowest_rank_layers(path: str, count: int, num_layers: int) -> tuple[int, ...]:
    """The `count` layers of lowest ARank in a `vlmkit analyze arank` file (ties: the lower layer)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"gammamod: ARank file {file} does not exist; write one with `vlmkit analyze arank`")
    ranks = json.loads(file.read_text()).get("arank")
    if not isinstance(ranks, list) or len(ranks) != num_layers:
        raise ConfigError(f"gammamod: {file} holds no ARank per layer of a {num_layers}-layer model")
    if count > num_layers:
        raise ConfigError(f"gammamod: count={count} is more than the model's {num_layers} decoder layers")
    order = sorted(range(num_layers), key=lambda layer: (ranks[layer], layer))
    return tuple(sorted(order[:count]))
