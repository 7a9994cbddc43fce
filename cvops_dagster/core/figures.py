"""One way to turn a matplotlib figure into the small PNG the Dagster UI shows inline.

Used by the training plots and the monitoring plots alike: a 64-colour palette PNG is about a
quarter of the RGBA one and indistinguishable for line, bar and heat-map plots. matplotlib and
Pillow are imported by the callers' modules; this module only needs the figure they pass.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def figure_png(fig: Any, dpi: int) -> bytes:  # noqa: ANN401 - a matplotlib Figure
    """``fig`` laid out tightly, rendered at ``dpi``, palette-quantized (64 colours); the figure
    is closed whatever happens, so a failed drawing never leaks it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        small = image.convert("RGB").quantize(colors=64)
    out = io.BytesIO()
    small.save(out, format="png", optimize=True)
    return out.getvalue()
