"""Speed benchmarks (``python -m benchmarks.<name>``), measured on a machine others share.

OpenMP threads that spin while they wait take the cores that the other threads of their team
need as soon as another process runs: on the shared 2-core machine one 100-key database update
took 6 s with 2 spinning threads and 0.5 s with waiting ones. The runtime reads its wait policy
once, when torch loads, so it is set here, before any benchmark imports torch (an
``OMP_WAIT_POLICY`` already in the environment wins).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
