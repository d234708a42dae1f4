"""Beam-search decode steps from a static beam cache, replayed from a CUDA graph on the GPU.

After the shared prefill (generate.py), every new token is one forward of the whole LLM over batch x beams
rows of one position. On an 8B model that is about a thousand small kernels per step, and launching them
from Python costs more than running them: one batch of 16 median clips x 5 beams on the H200 took 28 ms a
step of wall time for 14 ms of GPU time (bench/profile_step.py gen). A CUDA graph launches the whole step at
once.

A graph replays fixed kernels on fixed addresses, so everything a step touches must keep its shape and
place: `StaticBeamLayer` holds the beam cache at its final size (prompt + every new token) and writes each new
position at an index read from a device tensor; attention reads the whole buffer under a 4-D mask that hides
the positions not yet written (the buffers start zeroed: hidden garbage could be NaN, which a mask does not
hide). `StaticDecode` stands in for the LLM's forward during one generate() call: each one-position step
copies its inputs into fixed buffers and runs the forward there -- eagerly for the first step (the prompt's
last position, given as embeddings) and on the CPU, from a CUDA graph captured at the second step on a GPU.

The step computes what the growing cache computes: the same positions (transformers gives every row the cache
length), the same keys and values; the prompt part is still written once and beam reorders still move only
the generated part (beam_cache.PromptSharedLayer). Attention over the full buffer sums the same terms over
more masked-out keys, so results agree to rounding (tests/test_generate.py pins identical tokens in fp32).
"""
from __future__ import annotations

import logging

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from signllava.beam_cache import PromptSharedLayer

log = logging.getLogger("signllava")
_warned: list[str] = []
ALIGN = 8      # buffer lengths rounded up to this: SDPA's fused kernels want mask rows 16-byte aligned


class StaticBeamLayer(PromptSharedLayer):
    """PromptSharedLayer at a fixed size: update() writes at `slot` (a device tensor the caller sets before
    every step, shared by all layers) and returns the whole buffers; `length` is kept by the caller."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, beams: int, capacity: int, slot: torch.Tensor):
        super().__init__(keys, values, beams, capacity - keys.shape[2])
        self.k_buf[:, :, self.length:].zero_()
        self.v_buf[:, :, self.length:].zero_()
        self.slot = slot

    def _views(self):
        self.keys, self.values = self.k_buf, self.v_buf

    def update(self, key_states, value_states, *args, **kwargs):
        self.k_buf.index_copy_(2, self.slot, key_states)
        self.v_buf.index_copy_(2, self.slot, value_states)
        return self.k_buf, self.v_buf

    def _grow(self, need: int):
        raise RuntimeError(f"static beam cache full ({self.k_buf.shape[2]} positions, {need} needed)")


def base_causal_lm(llm):
    """The transformers model whose forward generate() calls (inside a peft wrapper, if any)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


class StaticDecode:
    """For one generate() call: the prefilled `cache` turned into StaticBeamLayers, and the causal LM's forward
    replaced by fixed-buffer steps (a CUDA graph from the second step on when `graphs`). Use as a context
    manager around generate(); the forward is restored on exit."""

    def __init__(self, llm, cache: DynamicCache, beams: int, new_tokens: int, graphs: bool):
        self.lm = base_causal_lm(llm)
        prefix = cache.layers[0].keys.shape[2]
        rows = cache.layers[0].keys.shape[0] * beams
        capacity = -(-(prefix + new_tokens) // ALIGN) * ALIGN
        dev = cache.layers[0].keys.device
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        cache.layers = [StaticBeamLayer(l.keys, l.values, beams, capacity, self.slot) for l in cache.layers]
        self.cache, self.capacity = cache, capacity
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.graphs = graphs and dev.type == "cuda"
        self.graph = self.logits = None

    def __enter__(self):
        self.own = self.lm.__dict__.get("forward")     # an instance-level forward (a hook's wrapper) to restore
        self.forward = self.lm.forward
        self.lm.forward = self._step
        return self

    def __exit__(self, *exc):
        if self.own is None:
            del self.lm.__dict__["forward"]
        else:
            self.lm.forward = self.own
        self.graph = self.logits = None

    def _run(self, **inputs) -> torch.Tensor:
        return self.forward(attention_mask=self.mask, position_ids=self.pos, cache=self.cache, use_cache=True,
                            return_dict=True, **inputs).logits

    def _step(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None,
              **kwargs):
        # generate() passes position_ids (mask cumsum - 1, per row) only to a forward that names them: keep the
        # name. It drops an all-ones attention mask (no padding): then every written position is seen.
        x = input_ids if input_ids is not None else inputs_embeds
        seen = self.cache.layers[0].length            # positions already cached; this one goes to slot `seen`
        if cache is not self.cache or x.shape[1] != 1 or position_ids is None or (
                attention_mask is not None and attention_mask.shape != (x.shape[0], seen + 1)):
            raise RuntimeError(f"static decode: a step it was not built for (inputs {tuple(x.shape)}, mask "
                               f"{None if attention_mask is None else tuple(attention_mask.shape)}, {seen} cached)")
        self.mask[:, 0, 0, :seen + 1] = True if attention_mask is None else attention_mask.bool()
        self.slot.fill_(seen)
        self.pos.copy_(position_ids)
        if inputs_embeds is not None:
            logits = self._run(inputs_embeds=inputs_embeds)
        else:
            self.ids.copy_(x)
            logits = self._graph_step() if self.graphs else self._run(input_ids=self.ids)
        for layer in self.cache.layers:
            layer.length = seen + 1
        return CausalLMOutputWithPast(logits=logits, cache=self.cache)

    def _graph_step(self) -> torch.Tensor:
        if self.graph is None and not self._capture():
            return self._run(input_ids=self.ids)
        self.graph.replay()
        return self.logits

    def _capture(self) -> bool:
        """Warm up on a side stream, then capture one step. False (and eager steps from now on) if this model's
        forward cannot be captured; the reason is logged once."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run(input_ids=self.ids)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run(input_ids=self.ids)
            return True
        except RuntimeError as e:
            self.graph = self.logits = None
            self.graphs = False
            if not _warned:
                _warned.append(str(e))
                log.warning("decode steps run eagerly: the CUDA graph capture failed (%s)", str(e).splitlines()[0][:300])
            return False
