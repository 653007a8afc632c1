"""A Llama-family decoder run over a static, preallocated KV cache: one cache row per
batch slot, every row at its own position.

Why our own loop over the layers: transformers' StaticCache writes one cache position
for the whole batch, and continuous batching needs each row at its own. The model's
own modules do the work (embeddings, norms, projections, MLP, rotary embedding); only
attention and the cache live here. On CUDA each decode shape is captured once as a CUDA
graph, so a step costs one replay instead of hundreds of kernel launches from Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Architectures whose decoder layer is: x + attn(norm(x)); x + mlp(norm(x)), with
# q/k/v/o projections, rotary embeddings and (optionally) q/k norms.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot run here (None: it can)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"architecture {cfg.model_type!r} (batched engine: {sorted(SUPPORTED_MODEL_TYPES)})"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return "the model does not have the usual model.layers/rotary_emb/lm_head layout"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """The model's RMSNorm (float32 statistics, as Llama's) in fewer kernels."""
    eps = getattr(norm, "variance_epsilon", None)
    out: torch.Tensor
    if eps is None:
        out = norm(x)
    else:
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * norm.weight
    return out


@dataclass
class _Fused:
    """One layer's projections concatenated, so each is one matrix product."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor | None  # None: call the layer's own MLP


def _fuse(layer: Any) -> _Fused:
    attn, mlp = layer.self_attn, layer.mlp
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight for p in projs]).detach()
    biases = [p.bias for p in projs]
    bias = torch.cat(biases).detach() if all(b is not None for b in biases) else None
    gate_up = None
    standard = all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if standard and mlp.gate_proj.bias is None and mlp.up_proj.bias is None:
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    return _Fused(weight, bias, gate_up)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the graph's output, overwritten by each replay


class StaticKVRunner:
    """The forward passes of one model over `slots` cache rows of `max_len` tokens.

    Device state between steps: `tokens[r]` is the next input token of row r and
    `pos[r]` its position. A decode step consumes them, writes the greedy pick back
    into `tokens` and advances `pos`, so the next step can be launched before the
    host has seen this one's tokens.
    """

    def __init__(
        self, model: Any, slots: int, max_len: int, use_graphs: bool, compile_step: bool = False
    ) -> None:
        cfg = model.config
        self.model = model
        self.slots = slots
        self.max_len = max_len
        self.device: torch.device = next(model.parameters()).device
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.groups = self.n_heads // self.n_kv
        self.layers = list(model.model.layers)
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        with torch.no_grad():
            self.fused = [_fuse(layer) for layer in self.layers]
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        vocab = int(model.get_output_embeddings().weight.shape[0])
        dtype = next(model.parameters()).dtype
        # One spare position: a span never slices the whole axis, which the compiler
        # would otherwise treat as a shape of its own (one more compile).
        shape = (slots, self.n_kv, max_len + 1, self.head_dim)
        dev = self.device
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        # Sampling parameters per row (greedy rows ignore them).
        self.temperature = torch.ones(slots, device=dev)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=dev)
        self.top_p = torch.ones(slots, device=dev)
        self.greedy = torch.ones(slots, dtype=torch.bool, device=dev)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # Graphs hold its address: allocated once, never replaced.
        self._arange = torch.arange(max(slots, max_len, vocab), device=dev)
        # Optional: inductor fuses the step's small kernels (one compile for all
        # shapes; the CUDA graphs are then captured around the compiled code).
        self.compiled = compile_step
        self._step = (
            torch.compile(self._decode_eager, dynamic=True) if compile_step else self._decode_eager
        )
        self._prefill = (
            torch.compile(self._prefill_eager, dynamic=True)
            if compile_step
            else self._prefill_eager
        )
        self.kv_bytes = sum(t.numel() * t.element_size() for t in self.k + self.v)

    # -- shapes ---------------------------------------------------------------

    def batch_bucket(self, rows_needed: int) -> int:
        """Decode batch size for rows 0..rows_needed-1: a power of two, or all slots."""
        # Compiled: at least 2 rows, as size 1 gets code of its own (one more compile).
        least = 2 if self.compiled else 1
        return min(self.slots, 1 << max(0, math.ceil(math.log2(max(least, rows_needed)))))

    def length_bucket(self, positions_needed: int) -> int:
        """Attention span for positions 0..positions_needed-1 (few distinct graph shapes)."""
        return min(self.max_len, max(64, 1 << math.ceil(math.log2(max(1, positions_needed)))))

    # -- per-row set-up ---------------------------------------------------------

    def set_row(
        self, row: int, *, temperature: float, top_k: int, top_p: float, greedy: bool
    ) -> None:
        self.temperature[row] = temperature
        self.top_k[row] = top_k
        self.top_p[row] = top_p
        self.greedy[row] = greedy

    # -- forward ------------------------------------------------------------------

    def _layers(
        self,
        tokens: torch.Tensor,  # [B, S]
        pos: torch.Tensor,  # [B, S]
        rows: torch.Tensor,  # [B] cache row of each batch row
        span: int,  # attend to cache positions 0..span-1; 0 = to this call's own tokens
    ) -> torch.Tensor:
        inner = self.model.model
        b, s = tokens.shape
        h = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(h, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if span:
            keys_at = self._arange[:span]
            mask = keys_at[None, None, None, :] <= pos[:, None, :, None]  # [B,1,S,span]
        else:  # fresh prompts from position 0: causal over themselves
            mask = pos[:, None, None, :] <= pos[:, None, :, None]  # [B,1,S,S]
        if s > 1 and self.groups > 1:
            mask = mask.repeat(1, 1, self.groups, 1)  # query rows are (group, position)
        row_idx = rows[:, None].expand(b, s)
        for i, layer in enumerate(self.layers):
            attn, fused = layer.self_attn, self.fused[i]
            x = _rms(h, layer.input_layernorm)
            qkv = F.linear(x, fused.qkv_weight, fused.qkv_bias)
            q, k, v = torch.split(qkv, [self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(b, s, self.n_heads, self.head_dim)
            k = k.reshape(b, s, self.n_kv, self.head_dim)
            v = v.reshape(b, s, self.n_kv, self.head_dim)
            if self.qk_norm:
                q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i][row_idx, :, pos] = k.transpose(1, 2).to(self.k[i].dtype)
            self.v[i][row_idx, :, pos] = v.transpose(1, 2).to(self.v[i].dtype)
            if span:
                keys, values = self.k[i][:b, :, :span], self.v[i][:b, :, :span]
            else:
                keys, values = k, v
            # Grouped-query attention without repeating K/V: fold each KV head's
            # query heads into the query-length axis.
            qg = q.reshape(b, self.n_kv, self.groups * s, self.head_dim)
            o = F.scaled_dot_product_attention(
                qg, keys, values, attn_mask=mask, scale=float(attn.scaling)
            )
            o = o.reshape(b, self.n_heads, s, self.head_dim).transpose(1, 2)
            h = h + attn.o_proj(o.reshape(b, s, self.n_heads * self.head_dim))
            x = _rms(h, layer.post_attention_layernorm)
            if fused.gate_up is None:
                h = h + layer.mlp(x)
            else:
                gate, up = F.linear(x, fused.gate_up).chunk(2, dim=-1)
                h = h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return _rms(h, inner.norm)

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run fresh prompts into their cache rows; returns next-token logits [n, vocab]."""
        longest, n = max(len(p) for p in prompts), len(rows)
        if self.compiled:
            # Sizes 0 and 1 get their own compiled code: keep both axes at 2 or more
            # (a repeated row writes the same values twice) so one compile serves all.
            longest = max(longest, 2)
            rows, prompts = (rows * 2, prompts * 2) if len(rows) == 1 else (rows, prompts)
        # Right-padded: pads write K/V past a row's end, which decode overwrites
        # before it ever reads that position.
        padded = [p + [0] * (longest - len(p)) for p in prompts]
        dev = self.device
        tokens = torch.tensor(padded, dtype=torch.long).to(dev, non_blocking=True)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long).to(dev, non_blocking=True)
        rows_t = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
        with torch.inference_mode():
            logits: torch.Tensor = self._prefill(tokens, rows_t, lens)
        return logits[:n]

    def _prefill_eager(
        self, tokens: torch.Tensor, rows: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        n, longest = tokens.shape
        pos = self._arange[:longest].expand(n, longest)
        h = self._layers(tokens, pos, rows, span=0)
        last = h[self._arange[:n], lens - 1]
        logits: torch.Tensor = self.model.lm_head(last).float()
        self.pos[rows] = lens
        return logits

    def _decode_eager(self, batch: int, span: int) -> torch.Tensor:
        rows = self._arange[:batch]
        # Rows not in use (or finished) still run: keep their writes inside the cache.
        pos = self.pos[:batch].clamp(max=span - 1)[:, None]
        h = self._layers(self.tokens[:batch, None], pos, rows, span)
        logits: torch.Tensor = self.model.lm_head(h[:, 0]).float()
        self.tokens[:batch] = logits.argmax(dim=-1)
        self.pos[:batch] += 1
        return logits

    def decode(self, batch: int, span: int) -> torch.Tensor:
        """One decode step of rows 0..batch-1; returns their logits [batch, vocab].

        `tokens[:batch]` holds the greedy picks afterwards (see `apply_sampling`).
        """
        with torch.inference_mode():
            if not self.use_graphs:
                return self._step(batch, span)
            g = self._graphs.get((batch, span))
            if g is None:
                g = self._capture(batch, span)
            g.graph.replay()
            return g.logits

    def _capture(self, batch: int, span: int) -> _Graph:
        saved = (self.tokens.clone(), self.pos.clone())
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            self._step(batch, span)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(batch, span)
        # Warm-up and capture advanced the state: put it back.
        self.tokens.copy_(saved[0])
        self.pos.copy_(saved[1])
        g = _Graph(graph, logits)
        self._graphs[(batch, span)] = g
        return g

    def warm_up(self) -> None:
        """Compile and capture every shape ahead of the first request, so none waits."""
        if self.compiled:
            # Odd sizes, unlike each other and the cache's dims: sizes equal at the first
            # compile are assumed to stay equal ("duck sizing"), a recompile when not.
            self.prefill([i % self.slots for i in range(3)], [[0] * 7, [0], [0] * 2])
        if self.use_graphs:
            spans = sorted({self.length_bucket(n) for n in range(1, self.max_len + 1)})
            batches = sorted({self.batch_bucket(n) for n in range(1, self.slots + 1)})
            with torch.inference_mode():
                for b in batches:
                    for span in spans:
                        if (b, span) not in self._graphs:
                            self._capture(b, span)
        self.tokens.zero_()
        self.pos.zero_()

    def graphs_captured(self) -> int:
        return len(self._graphs)

    # -- sampling -------------------------------------------------------------

    def sample(
        self, logits: torch.Tensor, rows: torch.Tensor, uniform: torch.Tensor
    ) -> torch.Tensor:
        """Next token per row of `logits`: greedy rows take the argmax, the others draw
        with their own temperature, top-k and top-p by inverting the CDF at `uniform`
        (one draw per row from the request's own seeded generator)."""
        with torch.inference_mode():
            greedy_pick = logits.argmax(dim=-1)
            vocab = logits.shape[-1]
            temp = self.temperature[rows].clamp(min=1e-5)
            x, order = torch.sort(logits / temp[:, None], dim=-1, descending=True)
            top_k = self.top_k[rows]
            k = torch.where(top_k > 0, top_k, vocab)
            x = x.masked_fill(self._vocab_ranks(vocab)[None, :] >= k[:, None], float("-inf"))
            probs = torch.softmax(x, dim=-1)
            before = probs.cumsum(dim=-1) - probs
            # A token is dropped once the tokens before it hold top_p: the first stays.
            probs = probs.masked_fill(before >= self.top_p[rows][:, None], 0.0)
            cdf = probs.cumsum(dim=-1)
            target = (uniform * cdf[:, -1])[:, None]
            idx = torch.searchsorted(cdf, target, right=True).clamp(max=vocab - 1)
            drawn = order.gather(1, idx)[:, 0]
            return torch.where(self.greedy[rows], greedy_pick, drawn)

    def _vocab_ranks(self, vocab: int) -> torch.Tensor:
        return self._arange[:vocab]

    def set_next(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Set the next input token of `rows` (after their prefill)."""
        self.tokens[rows] = tokens

    def apply_sampling(self, logits: torch.Tensor, batch: int, uniform: torch.Tensor) -> None:
        """Replace the greedy picks of a decode step by draws for the sampled rows."""
        rows = self._arange[:batch]
        with torch.inference_mode():
            self.tokens[:batch] = self.sample(logits, rows, uniform)
