"""Test-only re-statement of the official ResNet ACmix operator, written from docs/official-code.md
(the ResNet operator).

It keeps the official parameter names (conv1/conv2/conv3/conv_p/fc/dep_conv/rate1/rate2) and the official
arithmetic (ReflectionPad2d + unfold, q . (k + pe_q - pe_k), FC over the 3N head maps, group conv with zero
padding), including its limits: maps must be larger than the attention padding and even when strided.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialACmix(nn.Module):
    def __init__(self, cin: int, cout: int, k_att: int = 7, heads: int = 4, k_conv: int = 3, stride: int = 1):
        super().__init__()
        self.heads, self.k_att, self.k_conv, self.stride, self.cout = heads, k_att, k_conv, stride, cout
        self.hd = cout // heads
        self.rate1 = nn.Parameter(torch.full((1,), 0.5))
        self.rate2 = nn.Parameter(torch.full((1,), 0.5))
        self.conv1 = nn.Conv2d(cin, cout, 1)
        self.conv2 = nn.Conv2d(cin, cout, 1)
        self.conv3 = nn.Conv2d(cin, cout, 1)
        self.conv_p = nn.Conv2d(2, self.hd, 1)
        self.fc = nn.Conv2d(3 * heads, k_conv * k_conv, 1, bias=False)
        self.dep_conv = nn.Conv2d(k_conv * k_conv * self.hd, cout, k_conv, padding=1, stride=stride, groups=self.hd)
        shift = torch.zeros(k_conv * k_conv, k_conv, k_conv)
        for i in range(k_conv * k_conv):
            shift[i, i // k_conv, i % k_conv] = 1.0
        self.dep_conv.weight = nn.Parameter(shift.repeat(cout, 1, 1, 1))
        self.dep_conv.bias = None  # the official helper returns None into the bias

    def _coords(self, h: int, w: int) -> torch.Tensor:
        xs = torch.linspace(-1.0, 1.0, w).unsqueeze(0).repeat(h, 1)
        ys = torch.linspace(-1.0, 1.0, h).unsqueeze(1).repeat(1, w)
        return torch.stack([xs, ys]).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)
        b, c, h, w = q.shape
        s, ka = self.stride, self.k_att
        ho, wo = h // s, w // s
        pad = nn.ReflectionPad2d((ka - 1 + 1) // 2)
        pe = self.conv_p(self._coords(h, w).to(x))
        qa = q.view(b * self.heads, self.hd, h, w) * self.hd**-0.5
        ka_ = k.view(b * self.heads, self.hd, h, w)
        va = v.view(b * self.heads, self.hd, h, w)
        q_pe = pe
        if s > 1:
            qa, q_pe = qa[:, :, ::s, ::s], pe[:, :, ::s, ::s]
        unf_k = F.unfold(pad(ka_), ka, stride=s).view(b * self.heads, self.hd, ka * ka, ho, wo)
        unf_pe = F.unfold(pad(pe), ka, stride=s).view(1, self.hd, ka * ka, ho, wo)
        att = (qa.unsqueeze(2) * (unf_k + q_pe.unsqueeze(2) - unf_pe)).sum(1).softmax(1)
        unf_v = F.unfold(pad(va), ka, stride=s).view(b * self.heads, self.hd, ka * ka, ho, wo)
        out_att = (att.unsqueeze(1) * unf_v).sum(2).view(b, self.cout, ho, wo)
        heads = [t.view(b, self.heads, self.hd, h * w) for t in (q, k, v)]
        f = self.fc(torch.cat(heads, 1))  # (b, k2, hd, hw)
        f = f.permute(0, 2, 1, 3).reshape(b, -1, h, w)
        out_conv = self.dep_conv(f)
        return self.rate1 * out_att + self.rate2 * out_conv
