"""``fastssl bench``: time and memory of fastssl against the formulations users run today.

Every row is measured in this process (or, for CPU memory, in a child process) on this
machine; nothing is estimated. Results go to ``<out>/<device>-<date>-<op>.json`` plus a
markdown table and a plot beside it; ``<out>`` is ``--out``, by default ``./fastssl-bench``
(the checkout's ``benchmarks/results/`` holds only the committed results).

Ops: ``infonce`` (NT-Xent; size = 2N), ``siglip`` (sigmoid loss; size = n pairs),
``maxbatch`` (largest NT-Xent batch whose forward+backward completes), ``barlow`` and
``vicreg`` (cross-correlation losses; size = N), ``ema`` (momentum-encoder updates of
ResNet-50 / ViT-B/16 parameter lists), ``augment`` (the BYOL recipe, views per second),
``dino`` and ``ibot`` (prototype heads at K = 65,536; size = student rows), ``mae`` (MAE's
norm-pix masked-patch loss, 16-px patches, ratio 0.75; size = N images, --dims = side),
``kmeans`` (one iteration and a longer fit from the same init against the eager (N x K)
formulation, scikit-learn and faiss-cpu; size = N rows, --dims = D).

The parts:

- ``formulations``: the eager losses as the incumbents write them, fastssl's calls, inputs,
  model FLOPs;
- ``peers``: the incumbent libraries when they import, checked against fastssl;
- ``machine``: versions, device, command and commit of a run;
- ``timing``: GPU timing in process, CPU timing and peak RSS in a child process per case;
- ``maxbatch``: the largest batch (rows) that fits, by doubling and bisection;
- ``ema``, ``augment``, ``kmeans``: their own benchmarks;
- ``report``: printed rows, markdown, headline, summary, plot;
- ``runner``: ``run`` / ``run_all`` and the checks of their flags.
"""
from .formulations import (DINO_CROPS, IMPLS, PROTOTYPES, eager_barlow, eager_dino,  # noqa: F401
                           eager_ibot, eager_nt_xent, eager_siglip, eager_vicreg,
                           fastssl_dino, fastssl_ibot, fastssl_nt_xent, fastssl_siglip,
                           make_inputs, model_flops)
from .machine import environment  # noqa: F401
from .maxbatch import max_batch  # noqa: F401
from .report import headline, markdown, plot, summary  # noqa: F401
from .runner import (DTYPES, OPS, BenchmarkFailed, check_args, default_out, run,  # noqa: F401
                     run_all)
from .timing import cpu_case, implementation  # noqa: F401
