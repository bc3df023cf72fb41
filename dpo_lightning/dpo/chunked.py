"""Completion log-probs through the output head in chunks, never holding the (N, T, V) logits.

The plain path runs the whole model, materialises fp32 logits for every position of every row (prompt and
padding included) and keeps them for backward: for a 150k vocabulary that is most of a step's memory and much
of its time. Here the decoder body gives the final hidden states, only the positions that score a
completion token are kept, and `ChunkedTokenLogps` runs the head over `chunk_size` of them at a time: its
forward keeps only each token's log-prob and vocabulary-mean logit, and its backward recomputes each
chunk's logits instead of saving them, so the head's activations never exceed one chunk.

The gradient of log softmax(z)[y] with respect to the logits z is onehot(y) - softmax(z); the head's input
and weight gradients follow from it by the chain rule through z = h W^T + b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lightning.models.lora import base_model


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder body giving the final hidden states, output head) when the model's logits are exactly
    head(hidden) for the body's `last_hidden_state`; None when they are not (logit soft-capping or scaling,
    or a head that is not a plain Linear), and the plain path must be used."""
    inner = base_model(model)  # under a peft wrapper, the transformers model
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    body = getattr(inner, getattr(inner, "base_model_prefix", "") or "", None)
    config = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    reshaped = getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None) not in (None, 1.0)
    if not isinstance(head, torch.nn.Linear) or not isinstance(body, torch.nn.Module) or body is inner or reshaped:
        return None
    return body, head


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's (bf16-mixed) when it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and sums run in fp32 at least (bf16 logits would lose the log-probs' small differences)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden, weight, bias, dtype: torch.dtype, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """(C, V) logits of C hidden states in fp32 (or wider), the matmul in `dtype` (that of `weight` and `bias`,
    cast once per pass by the caller) as the model's head runs it. When the matmul already runs in the
    accumulation dtype the logits are written into `buffer` (C_max, V), one allocation for every chunk of a
    pass: a fresh (C, V) block per chunk would be mapped, faulted in page by page and unmapped again each time
    by the CPU's allocator."""
    with torch.autocast(hidden.device.type, enabled=False):
        if buffer is not None and dtype == buffer.dtype:
            out = buffer[: hidden.shape[0]]
            if bias is None:
                return torch.matmul(hidden.to(dtype), weight.t(), out=out)
            return torch.addmm(bias, hidden.to(dtype), weight.t(), out=out)
        logits = F.linear(hidden.to(dtype), weight, bias)
    return logits.to(_accumulation_dtype(dtype))


def _logits_buffer(count: int, chunk_size: int, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    shape = (min(count, chunk_size), weight.shape[0])
    return torch.empty(shape, dtype=_accumulation_dtype(dtype), device=weight.device)


def _cast(weight, bias, dtype: torch.dtype):
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """(C,) log sum exp over the last dimension of (C, V) logits, using their buffer as scratch (it is left
    holding exp(logits - max)): a chunk needs one (C, V) buffer, not two."""
    top = logits.amax(dim=-1, keepdim=True)
    return logits.sub_(top).exp_().sum(dim=-1).log_() + top.squeeze(-1)


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension, in place."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[y] and the vocabulary-mean logit of M hidden states, `chunk_size` rows at a time.

    hidden: (M, H); weight: (V, H); bias: (V,) or None; labels: (M,) -> token log-probs (M,) fp32, mean logits
    (M,) fp32 (not differentiable; for the logits/* metrics) and, with `with_weighting`, log sum_v p(v)^2 (M,)
    (not differentiable; WPO's weights), else an empty tensor.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, with_weighting: bool = False):
        dtype = _compute_dtype(hidden)
        low_weight, low_bias = _cast(weight, bias, dtype)
        count = hidden.shape[0]
        buffer = _logits_buffer(count, chunk_size, weight, dtype)
        logps = torch.empty(count, dtype=_accumulation_dtype(dtype), device=hidden.device)
        mean_logit = torch.empty_like(logps)
        square = torch.empty_like(logps) if with_weighting else logps.new_empty(0)
        for start in range(0, count, chunk_size):
            end = min(start + chunk_size, count)
            logits = _chunk_logits(hidden[start:end], low_weight, low_bias, dtype, buffer)
            picked = logits.gather(-1, labels[start:end, None]).squeeze(-1)
            mean_logit[start:end] = logits.mean(dim=-1)
            logps[start:end] = picked - _logsumexp_(logits)
            if with_weighting:
                # the buffer now holds e = exp(logits - max): log sum p^2 = log sum e^2 - 2 log sum e
                square[start:end] = 2 * (torch.linalg.vector_norm(logits, dim=-1).log() - logits.sum(dim=-1).log())
        ctx.save_for_backward(hidden, weight, labels, *([] if bias is None else [bias]))
        ctx.chunk_size, ctx.dtype, ctx.has_bias = chunk_size, dtype, bias is not None
        ctx.mark_non_differentiable(mean_logit, square)
        return logps, mean_logit, square

    @staticmethod
    def backward(ctx, grad_logps, grad_mean_logit, grad_square):
        hidden, weight, labels, *rest = ctx.saved_tensors
        bias = rest[0] if ctx.has_bias else None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        wide = _accumulation_dtype(ctx.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=wide, device=weight.device) if need_bias else None
        low_weight, low_bias = _cast(weight, bias, ctx.dtype)
        buffer = _logits_buffer(hidden.shape[0], ctx.chunk_size, weight, ctx.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            # d logp / d logits = onehot(label) - softmax(logits), times the incoming gradient; built in place in
            # the recomputed logits' buffer, so that a chunk needs one (C, V) buffer, not three
            grad_logits = _chunk_logits(hidden[start:end], low_weight, low_bias, ctx.dtype, buffer)
            _softmax_(grad_logits)
            scale = grad_logps[start:end].to(grad_logits.dtype)[:, None]
            grad_logits.mul_(-scale).scatter_add_(-1, labels[start:end, None], scale)
            with torch.autocast(hidden.device.type, enabled=False):
                low = grad_logits.to(ctx.dtype)
                if need_hidden:
                    grad_hidden[start:end] = (low @ low_weight).to(hidden.dtype)
                if need_weight:
                    if grad_weight.dtype == ctx.dtype:
                        grad_weight.addmm_(low.t(), hidden[start:end].to(ctx.dtype))  # no (V, H) temporary
                    else:
                        grad_weight += (low.t() @ hidden[start:end].to(ctx.dtype)).to(grad_weight.dtype)
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_token_logps(hidden, head: torch.nn.Linear, labels, chunk_size: int, with_weighting: bool = False):
    """(token log-probs (M,), mean logits (M,), log sum of squared probabilities (M,) with `with_weighting`, else
    None) of hidden states (M, H) under `head`, chunk by chunk."""
    logps, mean_logit, square = ChunkedTokenLogps.apply(
        hidden, head.weight, head.bias, labels, chunk_size, with_weighting
    )
    return logps, mean_logit, square if with_weighting else None
