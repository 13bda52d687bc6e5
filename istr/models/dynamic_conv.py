"""Instance interaction between a proposal feature and its RoI feature (Table 1d)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DynamicConv(nn.Module):
    """Sparse R-CNN's dynamic instance interaction (the official ISTR "dynamic attention").

    The proposal feature generates two matrices W1 [d, k] and W2 [k, d]; the RoI feature is multiplied by them:
    RoI [49, d] @ W1 -> LN -> ELU -> @ W2 -> LN -> ELU -> flatten [49 * d] -> Linear -> d -> LN -> ELU.

    forward(proposal [N, d], roi [N, S*S, d]) -> [N, d]
    """

    def __init__(self, hidden_dim: int = 256, dynamic_dim: int = 64, pooler_resolution: int = 7):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.dynamic_dim = dynamic_dim
        self.num_params = hidden_dim * dynamic_dim
        self.dynamic_layer = nn.Linear(hidden_dim, 2 * self.num_params)
        self.norm1 = nn.LayerNorm(dynamic_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.activation = nn.ELU(inplace=True)
        # input index = cell * d + channel, cell = y * S + x (the official layout)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, proposal: Tensor, roi: Tensor) -> Tensor:
        # dynamic_layer(proposal) split in two, computed as two products with halves of its weight: the same
        # numbers without materialising [N, 2*d*k] and its zero-filled gradient (6% of a smoke step on the CPU)
        weight, bias, n = self.dynamic_layer.weight, self.dynamic_layer.bias, self.num_params
        w1 = F.linear(proposal, weight[:n], bias[:n]).view(-1, self.hidden_dim, self.dynamic_dim)
        w2 = F.linear(proposal, weight[n:], bias[n:]).view(-1, self.dynamic_dim, self.hidden_dim)
        x = self.activation(self.norm1(roi @ w1))
        x = self.activation(self.norm2(x @ w2))
        return self.activation(self.norm3(self.out_layer(x.flatten(1))))


class MultiheadRoIAttention(nn.Module):
    """Table 1d's alternative: multi-head attention from the proposal feature (query) to its S*S RoI cells.

    The cells get a learned position embedding (otherwise attention could not tell cells apart, whereas
    DynamicConv's out_layer sees each cell's position). Output goes through LN -> ELU like DynamicConv's.

    forward(proposal [N, d], roi [N, S*S, d]) -> [N, d]
    """

    def __init__(self, hidden_dim: int = 256, num_heads: int = 8, pooler_resolution: int = 7):
        super().__init__()
        self.cell_embedding = nn.Parameter(torch.zeros(pooler_resolution**2, hidden_dim))
        nn.init.normal_(self.cell_embedding, std=0.02)
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim)
        self.activation = nn.ELU(inplace=True)

    def forward(self, proposal: Tensor, roi: Tensor) -> Tensor:
        keys = roi + self.cell_embedding
        out = self.attention(proposal.unsqueeze(1), keys, roi, need_weights=False)[0].squeeze(1)
        return self.activation(self.norm(out))

