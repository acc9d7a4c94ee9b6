"""Lightning callbacks: convert in ``setup``, lower the latent rank, distil from the original, export.

```python
trainer = L.Trainer(callbacks=[MLASurgery(config, calibration), GradualRankReduction(64), Distillation(), MLAExport("out/")])
```
"""

from .distill import Distillation
from .export import MLAExport
from .rank import GradualRankReduction
from .surgery import MLASurgery, find_model

__all__ = ["MLASurgery", "GradualRankReduction", "Distillation", "MLAExport", "find_model"]
