"""Per-site records of what the backend did, and the readable report ``explain`` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class SiteRecord:
    """One softmax-attention site: fused into the cupyflash op, or left alone with the reason."""

    graph: int  # which Dynamo graph (0, 1, ... in compile order)
    node: str  # the softmax node's name in that graph
    where: str  # the user's source line
    fused: bool
    reason: Optional[str] = None  # why it was left alone
    causal: Optional[bool] = None
    scale: Optional[float] = None
    has_bias: Optional[bool] = None
    softcap: Optional[float] = None  # 0.0: none
    window: Optional[tuple[int, int]] = None  # (left, right) keys around the diagonal; -1: unbounded
    # How the mask reached the op: "causal", "window", "key padding" (a small boolean (B, 1, 1, Nk) mask),
    # joined by " + "; "mask (NaN rows as eager)" / "mask (uniform rows as eager)" for any other mask filled with
    # -inf / a value <= -1e4, passed as a boolean keep-mask, with eager's rows where no key is seen; "dense bias"
    # when a (B, H, Nq, Nk) bias is passed; "none" without any.
    mask_form: Optional[str] = None
    kv_heads: Optional[int] = None  # grouped-query K/V: the op reads the K/V heads before their repeat
    # The op's out in (B, N, H, D) memory, as SDPA's: every user of the site's output swaps heads and tokens first
    # (rewrite._heads_swapped_by_every_user), so the copy that merges the heads is gone.
    token_major_out: Optional[bool] = None
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.fused:
            parts = [f"scale={self.scale:.6g}", f"causal={self.causal}", f"mask={self.mask_form}",
                     *([f"window={self.window}"] if self.window not in (None, (-1, -1)) else []),
                     f"bias={'yes' if self.has_bias else 'no'}",
                     *([f"softcap={self.softcap:.6g}"] if self.softcap else []),
                     *([f"kv_heads={self.kv_heads} (repeated K/V read before the repeat)"] if self.kv_heads else []),
                     *(["out=(B, N, H, D) memory"] if self.token_major_out else []),
                     *self.notes]
            return f"[graph {self.graph}] {self.node}: FUSED ({', '.join(parts)})  @ {self.where}"
        return f"[graph {self.graph}] {self.node}: skipped: {self.reason}  @ {self.where}"


@dataclass
class Report:
    sites: list[SiteRecord] = field(default_factory=list)

    @property
    def fused(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.fused]

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if not s.fused]

    def __str__(self) -> str:
        head = (f"cupyflash: {len(self.sites)} softmax-attention site(s), {len(self.fused)} fused, "
                f"{len(self.skipped)} left alone")
        return "\n".join([head, *(f"  {s}" for s in self.sites)])
