"""Switch for the CPU decode fast paths (fewer ops per layer: one rms_norm, q and k rotated
in one pass, a batch-1 decode attention without the per-request loop).

Every fast path computes the same bits as the plain code it replaces (checked in
tests/test_models_llama.py). ``ENABLED`` is read at call time, so a benchmark can compare
both in one process (``MODELPORT_CPU_FAST_DECODE=0`` starts with them off).
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("MODELPORT_CPU_FAST_DECODE", "1") != "0"

# --- exact greedy head: an int8 screen over the vocabulary, the fp32 refine on its survivors ---
#
# For a step whose every row is plain greedy (runner/sampler.py plain_greedy), the LM head's
# full bf16 matmul is replaced by a screen: the GREEDY_OUTLIERS hidden channels of largest
# magnitude (the final norm's massive activations, picked from the first greedy step: any
# choice is exact, this one keeps the bound tight) in fp32, the others through torch's int8
# weight-only matmul over a per-row int8 copy of the fp32 table (``exact_weight``). With
# x = x_S + x_R (outliers, rest) and w_n = w_nS + w_nR, the screen's logit approx_n obeys
#   |approx_n - w_n.x| <= e_n |x_R|                     (e_n = |w_nR - deq(q_n)|_2)
#                       + |deq(q_n)| |x_R - bf16(x_R)|   (the kernel reads bf16 activations)
#                       + |int8 part_n| 2^-8 (1 + 1e-2)  (its bf16 output, unit roundoff 2^-8)
#                       + TOL (|w_n| + |deq(q_n)|) |x|    (fp32 accumulation: screen, refine)
# (Cauchy-Schwarz, each norm inflated for its own rounding). A token n survives when
# approx_n + b_n >= max_m (approx_m - b_m); the fp32 argmax does (its logit is >= every other,
# each >= approx_m - b_m). The survivors' logits are then computed as LMHead's refine computes
# them (the same einsum, at least REFINE_TOPK wide: a width-1 einsum rounds differently), and
# their argmax (the first on a tie, as torch.argmax) is the token. A row with more than
# GREEDY_MAX_CANDIDATES survivors (or a NaN): None, and the caller takes the full head.
# ``GREEDY_INT8_HEAD`` is read at call time (``MODELPORT_CPU_GREEDY_INT8_HEAD=0``: off).
GREEDY_INT8_HEAD = os.environ.get("MODELPORT_CPU_GREEDY_INT8_HEAD", "1") != "0"
GREEDY_MAX_CANDIDATES = 64
GREEDY_OUTLIERS = 16
GREEDY_TOL = 2e-4  # > 3 * 576 * 2^-24: three fp32 dot products of SmolLM2's hidden size


class Int8GreedyHead:
    """A per-row int8 copy of an fp32 [V, D] head beside its outlier columns in fp32, with
    the per-row norms of the error bound."""

    def __init__(self, exact: torch.Tensor, outliers: torch.Tensor, chunk: int = 8192) -> None:
        v, d = exact.shape
        self.outliers = outliers
        rest = torch.ones(d, dtype=torch.bool)
        rest[outliers] = False
        self.rest = rest
        self.w_s_t = exact[:, outliers].float().t().contiguous()  # [|S|, V] fp32
        self.q = torch.empty(exact.shape, dtype=torch.int8)  # zero on the outlier columns
        self.scale = torch.empty(v, dtype=torch.bfloat16)
        self.err = torch.empty(v, dtype=torch.float32)
        self.qnorm = torch.empty(v, dtype=torch.float32)
        self.wnorm = torch.empty(v, dtype=torch.float32)
        for a in range(0, v, chunk):
            w = exact[a : a + chunk].float()
            wr = w * rest
            s = (wr.abs().amax(dim=1) / 127).clamp(min=1e-30).to(torch.bfloat16)
            sf = s.float().unsqueeze(1)
            deq = torch.round(wr / sf).clamp(-127, 127) * sf  # exact in fp32
            self.q[a : a + chunk] = (deq / sf).round().to(torch.int8)
            self.scale[a : a + chunk] = s
            up = 1 + 1e-5  # the norms' own rounding
            self.err[a : a + chunk] = (wr - deq).double().norm(dim=1).float() * up
            self.qnorm[a : a + chunk] = deq.double().norm(dim=1).float() * up
            self.wnorm[a : a + chunk] = w.double().norm(dim=1).float() * up
        # the bound's per-token factors as one [3, V] matrix (times |x_R|, |dx|, |x|), with
        # the (1 + 1e-3) that covers the bound's own fp32 rounding
        self.bound_rows = torch.stack(
            [self.err, self.qnorm, GREEDY_TOL * (self.wnorm + self.qnorm)]) * (1 + 1e-3)

    @classmethod
    def calibrated(cls, exact: torch.Tensor, hidden: torch.Tensor) -> Int8GreedyHead:
        k = min(GREEDY_OUTLIERS, exact.shape[1] - 1)
        outliers = hidden.float().pow(2).mean(dim=0).topk(k).indices.sort().values
        return cls(exact, outliers)

    def screen(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, V] approximate logits and their bounds: |approx - fp32 logit| <= bound."""
        x = hidden.float()
        xr = x * self.rest
        xb = xr.to(torch.bfloat16)
        part = torch._weight_int8pack_mm(xb, self.q, self.scale).float()
        approx = torch.addmm(part, x[:, self.outliers], self.w_s_t)
        up = 1 + 1e-5  # the norms' own rounding
        norms = torch.cat([xr.norm(dim=1, keepdim=True), (xr - xb.float()).norm(dim=1, keepdim=True),
                           x.norm(dim=1, keepdim=True)], dim=1) * up
        bound = torch.addmm(part.abs_().mul_(2.0**-8 * 1.01 * (1 + 1e-3)), norms,
                            self.bound_rows)
        return approx, bound

    def candidates(self, hidden: torch.Tensor) -> list[torch.Tensor] | None:
        """Per row of [T, D] hidden: the ascending token ids that may be the fp32 argmax."""
        approx, bound = self.screen(hidden)
        lo = (approx - bound).amax(dim=1, keepdim=True)
        keep = (approx + bound) >= lo  # a NaN anywhere: no row survives, so a fallback
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's ids ascending
        if len(cols) > GREEDY_MAX_CANDIDATES * len(keep):
            return None
        counts = torch.bincount(rows, minlength=len(keep)).tolist()
        if not all(0 < c <= GREEDY_MAX_CANDIDATES for c in counts):
            return None
        return list(cols.split(counts))


def greedy_from_candidates(hidden: torch.Tensor, exact: torch.Tensor,
                           cands: list[torch.Tensor], width: int) -> torch.Tensor:
    """The argmax over each row's candidates of the logits LMHead's refine computes."""
    k = max(width, max(len(c) for c in cands))
    idx = torch.stack([torch.cat([c, c[:1].expand(k - len(c))]) for c in cands])
    vals = torch.einsum("td,tkd->tk", hidden.to(exact.dtype), exact[idx]).float()
    pad = torch.arange(k).unsqueeze(0) >= torch.tensor([len(c) for c in cands]).unsqueeze(1)
    vals.masked_fill_(pad, float("-inf"))
    return idx.gather(1, vals.argmax(dim=1, keepdim=True)).squeeze(1)
