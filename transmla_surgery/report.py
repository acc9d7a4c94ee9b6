"""The conversion report: per-layer figures, printable as a rich table, serialisable as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table


@dataclass(frozen=True)
class LayerReport:
    layer: int
    rope_energy: float  # fraction of key energy kept by the rope channels after RoRoPE/FreqFold
    latent_energy: float  # fraction of (metric-weighted) [k_nope/α ; v] energy kept by the latent
    alpha: float  # divisor of k_nope in the joint PCA: BKV's rms(k_nope)/rms(v), over sqrt(key_weight)
    kv_before: int  # cached values per token in this layer, source: 2·G·d
    kv_after: int  # cached values per token in this layer, MLA: r_kv + d_rope
    calibration_tokens: int


@dataclass
class ConversionReport:
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int | None = None

    @property
    def kv_before(self) -> int:
        """Cached values per token, all layers, before conversion."""
        return sum(r.kv_before for r in self.layers)

    @property
    def kv_after(self) -> int:
        return sum(r.kv_after for r in self.layers)

    @property
    def compression(self) -> float:
        """Fraction of the KV cache removed (0.75 means a cache four times smaller)."""
        return 1.0 - self.kv_after / self.kv_before if self.kv_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "layers": [asdict(r) for r in self.layers],
            "kv_values_per_token_before": self.kv_before,
            "kv_values_per_token_after": self.kv_after,
            "compression": self.compression,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
        }

    def save_plot(self, path: str) -> str:
        """Per-layer energy kept (rope channels, latent) and the K/V balance as a PNG (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = [r.layer for r in self.layers]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        ax1.plot(layers, [r.rope_energy for r in self.layers], "o-", label="key energy in rope channels")
        ax1.plot(layers, [r.latent_energy for r in self.layers], "s-", label="energy kept by the latent")
        ax1.set_ylim(0, 1.02)
        ax1.set_ylabel("fraction kept")
        ax1.legend(loc="lower right")
        ax1.set_title(f"GQA → MLA: {self.kv_before} → {self.kv_after} KV values/token ({self.compression:.1%} smaller)")
        ax2.plot(layers, [r.alpha for r in self.layers], "^-", color="tab:green")
        ax2.set_ylabel("K/V balance α")
        ax2.set_xlabel("layer")
        from matplotlib.ticker import MaxNLocator

        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def __rich__(self) -> Table:
        table = Table(title=f"GQA → MLA conversion ({self.compression:.1%} smaller KV cache)")
        for col in ("layer", "rope energy", "latent energy", "K/V balance α", "KV/token before", "KV/token after"):
            table.add_column(col, justify="right")
        for r in self.layers:
            table.add_row(
                str(r.layer), f"{r.rope_energy:.3f}", f"{r.latent_energy:.3f}", f"{r.alpha:.3g}",
                str(r.kv_before), str(r.kv_after),
            )
        table.caption = (
            f"all layers: {self.kv_before} → {self.kv_after} values/token; {self.seconds:.1f} s"
            + (f", peak memory {self.peak_memory_bytes / 2**20:.0f} MiB" if self.peak_memory_bytes else "")
        )
        return table

    def __str__(self) -> str:
        import io

        from rich.console import Console

        console = Console(width=100, file=io.StringIO())
        console.print(self)
        return console.file.getvalue()
