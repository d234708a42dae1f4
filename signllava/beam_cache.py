"""A beam-search KV cache that leaves the prompt where it is.

transformers' DynamicCache grows by concatenation (a copy of the whole cache per layer per new token) and beam
search reorders it with index_select (another copy of the whole cache per layer per step). Our prompts are
hundreds to thousands of positions of video frames and the answers tens of tokens, so on a batch of clips those
two copies of mostly-prompt caches took 42 % of the GPU time of generation (bench/profile_step.py gen).

The beams of one clip share its prompt, so reordering beams never changes the prompt part of the cache. Here
each layer holds one buffer sized for prompt + new tokens: the prompt is written once, each new token in place,
a beam reorder gathers only the generated part, and attention reads a view of the filled length (no copy).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PromptSharedLayer(DynamicLayer):
    """Keys/values [batch x beams, heads, positions, head dim] in a preallocated buffer; positions before
    `prefix` are the prompt, identical across the beams of a clip."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, beams: int, new_tokens: int):
        super().__init__()
        B, H, L, D = keys.shape
        self.device = keys.device
        self.prefix = self.length = L
        self.k_buf = keys.new_empty(B * beams, H, L + new_tokens, D)
        self.v_buf = values.new_empty(B * beams, values.shape[1], L + new_tokens, values.shape[3])
        self.k_buf[:, :, :L] = keys.repeat_interleave(beams, dim=0)
        self.v_buf[:, :, :L] = values.repeat_interleave(beams, dim=0)
        self.is_initialized = True
        self._views()

    def _views(self):
        self.keys = self.k_buf[:, :, :self.length]
        self.values = self.v_buf[:, :, :self.length]

    def _grow(self, need: int):
        cap = max(need, 2 * self.k_buf.shape[2])
        for name in ("k_buf", "v_buf"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.k_buf.shape[2]:
            self._grow(end)
        self.k_buf[:, :, self.length:end] = key_states
        self.v_buf[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # beam_idx only moves beams within their clip, so the shared prompt part stays as it is.
        if self.length > self.prefix:
            idx = beam_idx.to(self.k_buf.device)
            gen = slice(self.prefix, self.length)
            self.k_buf[:, :, gen] = self.k_buf[:, :, gen].index_select(0, idx)
            self.v_buf[:, :, gen] = self.v_buf[:, :, gen].index_select(0, idx)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("PromptSharedLayer serves beam search only")

    crop = batch_repeat_interleave = batch_select_indices = _unsupported


def expand_for_beams(cache: DynamicCache, beams: int, new_tokens: int) -> DynamicCache:
    """A prefilled cache (one row per clip) -> the same cache object serving `beams` rows per clip, with room
    for `new_tokens` more positions (it grows if generation runs longer)."""
    cache.layers = [PromptSharedLayer(layer.keys, layer.values, beams, new_tokens) for layer in cache.layers]
    return cache
