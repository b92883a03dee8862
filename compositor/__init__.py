"""lorafleet composer: combine task adapters (exact linear sums, task arithmetic, TIES, DARE, magnitude
pruning, SVD re-compression, learned weights) and restore adapters onto a higher-precision base (PLR).

Reads and writes plain PEFT adapter directories only; loads models and evaluates through `trainer`.
"""

import trainer  # noqa: E402,F401  (light; filters bitsandbytes' import-time notice before compositor modules import it)
