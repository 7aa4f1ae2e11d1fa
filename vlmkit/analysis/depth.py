"""Measurements that choose layers for the layer-skipping methods, on a seeded sample set.

- `layer_contributions` / `calibrate_shortv`: ShortV's Layer Contribution, LC(l) = KL(p_l || p) of
  the last prompt token's next-token distribution with only layer l's visual tokens frozen, against
  the unpatched one, averaged over samples; the layers ranked from the lowest LC.
- `withdrawal_divergences` / `calibrate_vtw`: VTW's rule, the mean KL(p_K || p) with every visual
  token withdrawn before layer K, for K from `min_layer` on; K is the first with KL <= eta.
- `attention_ranks`: gamma-MoD's ARank, per layer the rank of each head's causal attention map over
  the prompt (lower triangle, diagonal removed), mean over heads, mean over samples.

Samples are `vlmkit.eval.benchmarks` samples (any image benchmark's `Sample`); prompts are built
with the model's chat template as `vlmkit eval` builds them. Every number is per sample, so a
batch gives the numbers of its samples run one by one (up to float rounding of padded batches).
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from tqdm import tqdm

import vlmkit
from vlmkit.adapters import adapter_for
from vlmkit.errors import ConfigError
from vlmkit.hashing import state_dict_hash
from vlmkit.methods.depth.shortv import ShortV
from vlmkit.methods.depth.vtw import VTW


def choose(samples: Sequence, count: int, seed: int = 0) -> list:
    """`count` samples drawn without replacement by `seed`, in their original order."""
    if count > len(samples):
        raise ConfigError(f"asked for {count} calibration samples; the data holds {len(samples)}")
    picked = sorted(random.Random(seed).sample(range(len(samples)), count))
    return [samples[index] for index in picked]


def model_inputs(processor, samples: Sequence, device, dtype) -> dict:
    """One left-padded batch of prompts (chat template, images first) for `samples`."""
    texts, images = [], []
    for sample in samples:
        media = sample.load_media()
        content = [{"type": "image"} for _ in media] + [{"type": "text", "text": sample.prompt}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images.extend(media)
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, padding=True, return_tensors="pt").to(device, dtype=dtype)


def _last_logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits[:, -1].double()


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row, KL(softmax(logits) || softmax(reference)) (`nn.KLDivLoss` on one row)."""
    log_p, log_q = logits.log_softmax(-1), reference.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _batches(model, processor, samples: Sequence, batch_size: int):
    for start in range(0, len(samples), batch_size):
        yield model_inputs(processor, samples[start : start + batch_size], model.device, model.dtype)


def _mean_divergence(model, processor, samples, batch_size, specs, progress: bool, what: str) -> list[float]:
    """Mean over samples of KL(p_spec || p_dense) at the last prompt token, for each method in `specs`."""
    totals = torch.zeros(len(specs), dtype=torch.float64)
    bar = tqdm(total=len(specs) * len(samples), desc=what, disable=not progress)
    for batch in _batches(model, processor, samples, batch_size):
        dense = _last_logits(model, batch)
        for index, method in enumerate(specs):
            with vlmkit.apply(model, method):
                totals[index] += _kl(_last_logits(model, batch), dense).sum().cpu()
            bar.update(dense.shape[0])
    bar.close()
    return (totals / len(samples)).tolist()


def layer_contributions(model, processor, samples: Sequence, batch_size: int = 4, progress: bool = True) -> list[float]:
    """ShortV's LC(l) for every decoder layer l (lower: freezing it changes the answer less)."""
    layers = len(adapter_for(model).decoder_layers)
    specs = [ShortV(layers=(layer,)) for layer in range(layers)]
    return _mean_divergence(model, processor, samples, batch_size, specs, progress, "shortv LC")


def calibrate_shortv(model, processor, samples: Sequence, batch_size: int = 4, progress: bool = True) -> dict:
    """The content of a `vlmkit calibrate shortv` file: LC per layer and the layers by rising LC."""
    contribution = layer_contributions(model, processor, samples, batch_size, progress)
    ranking = sorted(range(len(contribution)), key=lambda layer: (contribution[layer], layer))
    return {
        "method": "shortv", "model_hash": state_dict_hash(model), "num_layers": len(contribution),
        "samples": len(samples), "contribution": contribution, "ranking": ranking,
    }


def withdrawal_divergences(model, processor, samples: Sequence, min_layer: int = 5, batch_size: int = 4,
                           progress: bool = True) -> dict[int, float]:
    """VTW's mean KL(p_K || p) for every K from `min_layer` to the last layer."""
    layers = len(adapter_for(model).decoder_layers)
    if not 1 <= min_layer < layers:
        raise ConfigError(f"vtw: min_layer={min_layer} must lie in 1..{layers - 1} for a model with {layers} decoder layers")
    candidates = list(range(min_layer, layers))
    values = _mean_divergence(model, processor, samples, batch_size, [VTW(layer=k) for k in candidates], progress, "vtw KL")
    return dict(zip(candidates, values))


def calibrate_vtw(model, processor, samples: Sequence, eta: float = 0.003, min_layer: int = 5, batch_size: int = 4,
                  progress: bool = True) -> dict:
    """The content of a `vlmkit calibrate vtw` file: KL per K and the first K with KL <= eta (or None)."""
    divergence = withdrawal_divergences(model, processor, samples, min_layer, batch_size, progress)
    layer = next((k for k, value in divergence.items() if value <= eta), None)
    return {
        "method": "vtw", "model_hash": state_dict_hash(model), "num_layers": len(adapter_for(model).decoder_layers),
        "samples": len(samples), "eta": eta, "min_layer": min_layer,
        "kl": {str(k): v for k, v in divergence.items()}, "layer": layer,
    }


def attention_ranks(model, processor, samples: Sequence, progress: bool = True) -> list[float]:
    """gamma-MoD's ARank of every decoder layer, mean over samples (one sample per forward).

    Per layer the attention maps are computed from the layer's input (the model's own rotary
    tables and projections), one layer at a time: A_h = softmax(q_h k_h^T / sqrt(d)) under the
    causal mask, lower triangle, diagonal set to 0; the layer's rank is the mean of matrix_rank(A_h).
    """
    adapter = adapter_for(model)
    layers = adapter.decoder_layers
    totals = torch.zeros(len(layers), dtype=torch.float64)
    for sample in tqdm(samples, desc="arank", disable=not progress):
        batch = model_inputs(processor, [sample], model.device, model.dtype)
        inputs: dict[int, tuple] = {}
        handles = [
            layer.register_forward_pre_hook(
                lambda module, args, kwargs, index=index: inputs.__setitem__(
                    index, (kwargs.get("hidden_states", args[0] if args else None), kwargs["position_embeddings"])
                ),
                with_kwargs=True,
            )
            for index, layer in enumerate(layers)
        ]
        try:
            with torch.inference_mode():
                model(**batch)
        finally:
            for handle in handles:
                handle.remove()
        with torch.inference_mode():
            for index, layer in enumerate(layers):
                hidden, rotary = inputs.pop(index)
                totals[index] += _layer_rank(adapter, layer, hidden, rotary)
    return (totals / len(samples)).tolist()


def _layer_rank(adapter, layer, hidden: torch.Tensor, rotary) -> float:
    attention = adapter.attention_module(layer)
    query, keys = adapter.probe_projections(layer, hidden, rotary, keys=True, all_queries=True)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    length = hidden.shape[1]
    scores = (query @ keys.transpose(-1, -2)).double() * attention.scaling
    causal = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
    maps = scores.masked_fill(~causal, float("-inf")).softmax(-1)[0]
    maps = maps.tril(-1)  # lower triangle, diagonal removed
    return float(torch.linalg.matrix_rank(maps).double().mean())
