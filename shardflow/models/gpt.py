"""A nanoGPT-shaped GPT-2: the reference transformer that shardflow parallelises and compares against.

Plain PyTorch with nanoGPT's module names (``transformer.h.0.attn.c_attn``, ``lm_head``, ...) so that
parameter-name globs in hints read as they do elsewhere; ``forward`` returns the loss, as every model
handed to ``sf.compile`` must.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a GPT; GPT-2 small is ``vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768``."""

    vocab_size: int
    """Number of token ids; logits have this many classes."""
    block_size: int
    """Longest sequence the model accepts (rows of the learned position embedding)."""
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability after embeddings, in attention and on each residual branch; 0 for equality tests."""
    bias: bool = True
    """Biases in every Linear and LayerNorm (GPT-2 has them); the ``lm_head`` never has one."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}: "
                f"pick n_embd as a multiple of n_head (e.g. {self.n_head * max(1, self.n_embd // self.n_head)})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count of ``GPT(self)``, counting the tied ``lm_head``/``wte`` weight once.

        ``non_embedding`` leaves out the position embedding (nanoGPT's convention: the token embedding stays,
        because as the ``lm_head`` it does matmul work).
        """
        d, b = self.n_embd, int(self.bias)
        block = 12 * d * d + 2 * d + 11 * d * b  # weights of c_attn, c_proj, c_fc, c_proj; ln gains; biases
        total = self.vocab_size * d + self.n_layer * block + d + d * b  # wte (= lm_head), blocks, ln_f
        return total if non_embedding else total + self.block_size * d

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at full context: ``6 N + 12 L d T``.

        ``N`` is ``num_params(non_embedding=True)`` (each weight costs 2 FLOPs forward and 4 backward per token),
        ``L d T`` is ``n_layer * n_embd * block_size`` for the ``QKᵀ`` and ``AV`` matmuls. The PaLM-paper
        formula nanoGPT's MFU estimate uses: it counts the full attention square, not the causal half.
        """
        return 6 * self.num_params() + 12 * self.n_layer * self.n_embd * self.block_size


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        # NOTE: one fused projection, laid out [q | k | v] along the output dim; a tensor-parallel split of
        # c_attn.weight must keep each head's rows of q, k and v together.
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.size()
        q, k, v = self.c_attn(x).split(width, dim=2)
        # (batch, seq, width) -> (batch, n_head, seq, head_dim)
        q = q.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2)
        k = k.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(batch, seq, width)
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Trunk(nn.Module):
    """The modules under ``transformer.``: a typed stand-in for nanoGPT's ``ModuleDict``; ``GPT.forward`` runs them."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class GPT(nn.Module):
    """GPT-2 language model; ``model(idx, targets)`` is the mean next-token cross-entropy.

    ``lm_head.weight`` *is* ``transformer.wte.weight`` (weight tying), so ``named_parameters()`` lists it once,
    as ``transformer.wte.weight``: a hint for the output projection names that, not ``lm_head.weight``.
    Initialisation follows GPT-2 (normal, std 0.02; the two residual projections ``*.c_proj.weight`` scaled by
    ``1/sqrt(2 n_layer)``) and draws from torch's global RNG: seed with ``torch.manual_seed`` first.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(_init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of predicting ``targets`` (batch, seq) from token ids ``idx`` (batch, seq); a 0-d tensor."""
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (batch, seq, vocab) for token ids ``idx`` (batch, seq)."""
        seq = idx.size(1)
        if seq > self.config.block_size:
            raise ValueError(
                f"sequence length {seq} exceeds GPTConfig.block_size={self.config.block_size}: "
                "feed shorter sequences or build the model with a larger block_size"
            )
        pos = torch.arange(seq, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    predict = logits  # what evaluation metrics (accuracy) read, by the name every built-in model gives it

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted by walking the module (tied weight once); equals ``config.num_params``."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
