"""The fused, chunked path: per-token statistics from hidden states and head weights, never ``B x T x V``.

:mod:`.engine` is the generic machinery (:class:`HeadRows`, head preparation, chunk sizing,
the autograd function with its analytic backward); :mod:`.kernels` holds one kernel per
statistic and the fused statistics producers. A producer returns what its plain counterpart
returns, and the loss is composed by the same ``*_from_stats`` function on both paths:

===============================  ====================================================
fused producer                   plain producer -> composition
===============================  ====================================================
:func:`label_logps`,             :func:`aligndistil.losses.ops.label_logps`
:func:`label_logps_group`        -> the DPO family (:mod:`aligndistil.losses.dpo`)
:func:`token_level_stats`        :func:`aligndistil.losses.tdpo.pair_token_stats`
                                 -> ``tdpo_loss_from_stats``, ``sparsepo_loss_from_stats``
:func:`aligndistil_token_stats`  :func:`aligndistil.losses.aligndistil.aligndistil_token_stats`
                                 -> ``aligndistil_loss_from_stats``
:func:`teacher_tvd`              :func:`aligndistil.losses.ops.token_tvd` (teacher cache)
===============================  ====================================================
"""

from aligndistil.losses.fused.engine import (  # noqa: F401
    AUTO_CHUNK_BYTES,
    DEFAULT_CHUNK_SIZE,
    STATS,
    HeadRows,
    auto_chunk_rows,
    check_chunk_size,
    fast_bf16_cpu,
)
from aligndistil.losses.fused.kernels import (  # noqa: F401
    ReverseKL,
    aligndistil_token_stats,
    label_logps,
    label_logps_group,
    teacher_tvd,
    token_level_stats,
)

__all__ = [
    "AUTO_CHUNK_BYTES", "DEFAULT_CHUNK_SIZE", "STATS", "HeadRows", "auto_chunk_rows", "check_chunk_size",
    "fast_bf16_cpu", "ReverseKL", "aligndistil_token_stats", "label_logps", "label_logps_group", "teacher_tvd",
    "token_level_stats",
]
